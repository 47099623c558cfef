// Writing safetensors files. The header goes first (every tensor's offset is known up front), then the
// tensors land at fixed offsets in any order and from any thread. The file only gets its final name after
// every byte is written and fsynced, so a crash or an error never leaves a plausible-looking broken file.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/log.h"
#include "io/safetensors.h"

namespace mxlm::io {
namespace {

namespace fs = std::filesystem;

std::string errno_text() { return std::strerror(errno); }

void pwrite_all(int fd, const uint8_t* bytes, uint64_t size, uint64_t offset, const fs::path& path) {
  while (size > 0) {
    const ssize_t n = ::pwrite(fd, bytes, size, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("{}: write failed ({})", path.string(), errno_text());
    }
    bytes += n;
    size -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

void fsync_directory(const fs::path& dir) {
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail("{}: cannot open directory to fsync ({})", dir.string(), errno_text());
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) fail("{}: fsync of directory failed ({})", dir.string(), std::strerror(err));
}

// The order the Rust crate sorts dtypes in (its enum order): larger elements come later, and it writes
// the data in descending order, so wider types come first and every tensor stays aligned.
int alignment_rank(DType dtype) {
  switch (dtype) {
    case DType::BOOL:
      return 0;
    case DType::U8:
      return 1;
    case DType::I8:
      return 2;
    case DType::F8_E5M2:
      return 3;
    case DType::F8_E4M3:
      return 4;
    case DType::I16:
      return 5;
    case DType::F16:
      return 6;
    case DType::BF16:
      return 7;
    case DType::I32:
      return 8;
    case DType::F32:
      return 9;
    case DType::F64:
      return 10;
    case DType::I64:
      return 11;
  }
  return 0;
}

uint64_t planned_numel(const PlannedTensor& tensor) {
  uint64_t n = 1;
  for (int64_t dim : tensor.shape) {
    if (dim < 0) fail("tensor '{}': negative dimension {}", tensor.name, dim);
    n *= static_cast<uint64_t>(dim);
  }
  return n;
}

std::string serialize_header_unchecked(const std::vector<PlannedTensor>& tensors,
                                       const std::map<std::string, std::string>& metadata) {
  // Built piece by piece (a whole ordered_json object would make 20k-tensor headers quadratic): __metadata__
  // first, then tensors in data order, fields in the order dtype, shape, data_offsets -- exactly what the
  // Rust crate emits, compact, no spaces.
  std::string json = "{";
  if (!metadata.empty()) json += "\"__metadata__\":" + nlohmann::json(metadata).dump();
  std::set<std::string_view> seen;
  uint64_t offset = 0;
  for (const auto& tensor : tensors) {
    if (tensor.name == "__metadata__") fail("a tensor cannot be named __metadata__");
    if (!seen.insert(tensor.name).second) fail("tensor '{}' is planned twice", tensor.name);
    const uint64_t nbytes = tensor.nbytes();
    nlohmann::ordered_json entry = {{"dtype", std::string(dtype_name(tensor.dtype))},
                                    {"shape", tensor.shape},
                                    {"data_offsets", {offset, offset + nbytes}}};
    if (json.size() > 1) json += ',';
    json += nlohmann::json(tensor.name).dump() + ":" + entry.dump();
    offset += nbytes;
  }
  json += '}';
  json.append((8 - json.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  const uint64_t size = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((size >> (8 * i)) & 0xff);
  out += json;
  return out;
}

}  // namespace

uint64_t PlannedTensor::nbytes() const { return planned_numel(*this) * dtype_size(dtype); }

void sort_for_alignment(std::vector<PlannedTensor>& tensors) {
  std::stable_sort(tensors.begin(), tensors.end(), [](const PlannedTensor& a, const PlannedTensor& b) {
    const int ra = alignment_rank(a.dtype), rb = alignment_rank(b.dtype);
    return ra != rb ? ra > rb : a.name < b.name;
  });
}

std::string serialize_header(const std::vector<PlannedTensor>& tensors,
                             const std::map<std::string, std::string>& metadata) {
  try {
    return serialize_header_unchecked(tensors, metadata);
  } catch (const nlohmann::json::exception& e) {
    fail("cannot write a safetensors header: {}", e.what());  // e.g. a name that is not UTF-8
  }
}

SafetensorsWriter::SafetensorsWriter(fs::path path, std::vector<PlannedTensor> tensors,
                                     std::map<std::string, std::string> metadata)
    : path_(std::move(path)), tensors_(std::move(tensors)) {
  partial_path_ = path_;
  partial_path_ += ".partial";
  const std::string header = serialize_header(tensors_, metadata);
  data_offset_ = header.size();
  uint64_t offset = 0;
  for (const auto& tensor : tensors_) {
    const uint64_t nbytes = tensor.nbytes();
    ranges_[tensor.name] = {offset, offset + nbytes};
    written_[tensor.name] = 0;
    offset += nbytes;
  }
  file_size_ = data_offset_ + offset;

  fd_ = ::open(partial_path_.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail("{}: cannot create ({})", partial_path_.string(), errno_text());
  try {
    pwrite_all(fd_, reinterpret_cast<const uint8_t*>(header.data()), header.size(), 0, partial_path_);
    if (::ftruncate(fd_, static_cast<off_t>(file_size_)) != 0)
      fail("{}: cannot size the file to {} bytes ({})", partial_path_.string(), file_size_, errno_text());
  } catch (...) {
    ::close(fd_);
    ::unlink(partial_path_.c_str());
    fd_ = -1;
    throw;
  }
}

SafetensorsWriter::~SafetensorsWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(partial_path_.c_str());
}

void SafetensorsWriter::write(std::string_view name, std::span<const uint8_t> bytes) {
  auto it = ranges_.find(name);
  if (it == ranges_.end()) fail("{}: tensor '{}' was not planned", path_.string(), name);
  const uint64_t nbytes = it->second.second - it->second.first;
  if (bytes.size() != nbytes)
    fail("{}: tensor '{}' needs {} bytes but got {}", path_.string(), name, nbytes, bytes.size());
  write_part(name, 0, bytes);
}

void SafetensorsWriter::write_part(std::string_view name, uint64_t offset, std::span<const uint8_t> bytes) {
  if (committed_ || fd_ < 0) fail("{}: write after commit", path_.string());
  auto it = ranges_.find(name);
  if (it == ranges_.end()) fail("{}: tensor '{}' was not planned", path_.string(), name);
  const auto [begin, end] = it->second;
  if (offset > end - begin || bytes.size() > end - begin - offset)
    fail("{}: write of {} bytes at offset {} overruns tensor '{}' ({} bytes)", path_.string(), bytes.size(), offset,
         name, end - begin);
  pwrite_all(fd_, bytes.data(), bytes.size(), data_offset_ + begin + offset, partial_path_);
  std::lock_guard lock(mutex_);
  written_.find(name)->second += bytes.size();
}

void SafetensorsWriter::commit() {
  if (committed_) return;
  if (fd_ < 0) fail("{}: writer is not open", path_.string());
  {
    std::lock_guard lock(mutex_);
    for (const auto& [name, range] : ranges_) {
      const uint64_t nbytes = range.second - range.first, written = written_.at(name);
      if (written != nbytes)
        fail("{}: tensor '{}' got {} of its {} bytes; not committing", path_.string(), name, written, nbytes);
    }
  }
  if (::fsync(fd_) != 0) fail("{}: fsync failed ({})", partial_path_.string(), errno_text());
  const int rc = ::close(fd_);
  fd_ = -1;
  if (rc != 0) fail("{}: close failed ({})", partial_path_.string(), errno_text());
  if (::rename(partial_path_.c_str(), path_.c_str()) != 0)
    fail("{}: cannot rename to {} ({})", partial_path_.string(), path_.string(), errno_text());
  committed_ = true;
  fsync_directory(path_.parent_path());
}

std::vector<ShardPlan> plan_shards(const std::vector<PlannedTensor>& tensors, uint64_t max_shard_bytes) {
  if (max_shard_bytes == 0) fail("maximum shard size must be positive");
  std::vector<ShardPlan> shards;
  for (const auto& tensor : tensors) {
    const uint64_t nbytes = tensor.nbytes();
    if (shards.empty() || (!shards.back().tensors.empty() && shards.back().data_bytes + nbytes > max_shard_bytes))
      shards.emplace_back();
    shards.back().tensors.push_back(tensor);
    shards.back().data_bytes += nbytes;
  }
  if (shards.empty()) shards.emplace_back();
  if (shards.size() == 1) {
    shards[0].file_name = "model.safetensors";
  } else {
    for (size_t i = 0; i < shards.size(); ++i)
      shards[i].file_name = fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, shards.size());
  }
  return shards;
}

void write_index(const fs::path& dir, const std::vector<ShardPlan>& shards) {
  // Same layout as transformers' save_pretrained: sorted keys, two-space indent, trailing newline.
  nlohmann::json index;
  uint64_t total = 0;
  nlohmann::json weight_map = nlohmann::json::object();
  for (const auto& shard : shards) {
    total += shard.data_bytes;
    for (const auto& tensor : shard.tensors) {
      if (weight_map.contains(tensor.name)) fail("write_index: tensor '{}' is in two shards", tensor.name);
      weight_map[tensor.name] = shard.file_name;
    }
  }
  index["metadata"] = {{"total_size", total}};
  index["weight_map"] = std::move(weight_map);
  write_file_atomic(dir / "model.safetensors.index.json", index.dump(2) + "\n");
}

uint64_t parse_size(std::string_view text) {
  const std::string original(text);
  auto is_space = [](char c) { return c == ' ' || c == '\t'; };
  while (!text.empty() && is_space(text.front())) text.remove_prefix(1);
  while (!text.empty() && is_space(text.back())) text.remove_suffix(1);

  size_t number_end = 0;
  while (number_end < text.size() &&
         (std::isdigit(static_cast<unsigned char>(text[number_end])) || text[number_end] == '.'))
    ++number_end;
  const std::string number(text.substr(0, number_end));
  std::string unit(text.substr(number_end));
  while (!unit.empty() && is_space(unit.front())) unit.erase(unit.begin());
  for (auto& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));

  if (number.empty() || std::count(number.begin(), number.end(), '.') > 1 || number.front() == '.' ||
      number.back() == '.')
    fail("size '{}': expected a number with an optional unit (e.g. 5GB, 500MB, 1.5GiB, 1048576)", original);

  static const std::array<std::pair<std::string_view, double>, 10> kUnits{{
      {"", 1.0},
      {"B", 1.0},
      {"KB", 1e3},
      {"MB", 1e6},
      {"GB", 1e9},
      {"TB", 1e12},
      {"KIB", 1024.0},
      {"MIB", 1024.0 * 1024},
      {"GIB", 1024.0 * 1024 * 1024},
      {"TIB", 1024.0 * 1024 * 1024 * 1024},
  }};
  const auto unit_it =
      std::find_if(kUnits.begin(), kUnits.end(), [&](const auto& entry) { return entry.first == unit; });
  if (unit_it == kUnits.end())
    fail("size '{}': unknown unit '{}' (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)", original, unit);

  uint64_t bytes;
  if (number.find('.') == std::string::npos && unit_it->second == std::floor(unit_it->second)) {
    // Integers stay exact: no detour through double for "123456789123".
    if (number.size() > 19) fail("size '{}' is too large", original);
    const uint64_t value = std::stoull(number);
    const auto multiplier = static_cast<uint64_t>(unit_it->second);
    if (value > (uint64_t{1} << 62) / multiplier) fail("size '{}' is too large", original);
    bytes = value * multiplier;
  } else {
    const double value = std::stod(number) * unit_it->second;
    if (!(value < 4.6e18)) fail("size '{}' is too large", original);
    bytes = static_cast<uint64_t>(value);  // truncates like int(float * multiplier) in huggingface_hub
  }
  if (bytes == 0) fail("size '{}' must be positive", original);
  return bytes;
}

void write_file_atomic(const fs::path& path, std::string_view contents) {
  fs::path temp = path;
  temp += fmt::format(".tmp.{}", ::getpid());
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("{}: cannot create ({})", temp.string(), errno_text());
  try {
    pwrite_all(fd, reinterpret_cast<const uint8_t*>(contents.data()), contents.size(), 0, temp);
    if (::fsync(fd) != 0) fail("{}: fsync failed ({})", temp.string(), errno_text());
  } catch (...) {
    ::close(fd);
    ::unlink(temp.c_str());
    throw;
  }
  if (::close(fd) != 0) {
    ::unlink(temp.c_str());
    fail("{}: close failed ({})", temp.string(), errno_text());
  }
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    const std::string err = errno_text();
    ::unlink(temp.c_str());
    fail("{}: cannot rename to {} ({})", temp.string(), path.string(), err);
  }
  fsync_directory(path.parent_path());
}

}  // namespace mxlm::io
