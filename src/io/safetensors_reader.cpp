// Reading one .safetensors file: validate the header completely before any pointer into the mapping is
// handed out, so a corrupt or hostile file is an Error and never an out-of-bounds read.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/safetensors.h"

namespace mxlm::io {
namespace {

using nlohmann::json;

// Largest byte count we accept anywhere (2^62): keeps every sum and product below 2^64.
constexpr uint64_t kMaxBytes = uint64_t{1} << 62;

uint64_t checked_numel(const std::vector<int64_t>& shape, const std::string& origin, const std::string& name) {
  uint64_t numel = 1;
  for (int64_t dim : shape) {
    if (dim < 0) fail("{}: tensor '{}' has a negative dimension {}", origin, name, dim);
    if (dim != 0 && numel > kMaxBytes / static_cast<uint64_t>(dim))
      fail("{}: tensor '{}' has an absurdly large shape", origin, name);
    numel *= static_cast<uint64_t>(dim);
  }
  return numel;
}

uint64_t as_offset(const json& value, const std::string& origin, const std::string& name) {
  if (!value.is_number_unsigned())
    fail("{}: tensor '{}' has a data offset that is not a non-negative integer", origin, name);
  return value.get<uint64_t>();
}

TensorInfo parse_tensor_entry(const std::string& name, const json& entry, const std::string& origin) {
  if (!entry.is_object()) fail("{}: header entry '{}' is not an object", origin, name);
  TensorInfo info;
  info.name = name;

  auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end() || !dtype_it->is_string()) fail("{}: tensor '{}' has no dtype string", origin, name);
  const auto dtype_text = dtype_it->get<std::string>();
  auto dtype = parse_dtype(dtype_text);
  if (!dtype) fail("{}: tensor '{}' has unknown dtype '{}'", origin, name, dtype_text);
  info.dtype = *dtype;

  auto shape_it = entry.find("shape");
  if (shape_it == entry.end() || !shape_it->is_array()) fail("{}: tensor '{}' has no shape array", origin, name);
  for (const auto& dim : *shape_it) {
    if (!dim.is_number_integer()) fail("{}: tensor '{}' has a shape entry that is not an integer", origin, name);
    if (dim.is_number_unsigned() && dim.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
      fail("{}: tensor '{}' has an absurdly large shape", origin, name);
    info.shape.push_back(dim.get<int64_t>());
  }

  auto offsets_it = entry.find("data_offsets");
  if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2)
    fail("{}: tensor '{}' needs data_offsets [begin, end]", origin, name);
  info.begin = as_offset((*offsets_it)[0], origin, name);
  info.end = as_offset((*offsets_it)[1], origin, name);
  if (info.end < info.begin)
    fail("{}: tensor '{}' has data_offsets [{}, {}] with end before begin", origin, name, info.begin, info.end);

  const uint64_t numel = checked_numel(info.shape, origin, name);
  const uint64_t element = dtype_size(info.dtype);
  if (numel > kMaxBytes / element) fail("{}: tensor '{}' has an absurdly large shape", origin, name);
  if (info.end - info.begin != numel * element)
    fail("{}: tensor '{}' has {} bytes at [{}, {}) but {} x {} needs {}", origin, name, info.end - info.begin,
         info.begin, info.end, dtype_text, fmt::format("[{}]", fmt::join(info.shape, ", ")), numel * element);
  return info;
}

// Finds a repeated top-level key (nlohmann's DOM silently keeps the last one). A SAX pass, because
// nlohmann's parser callbacks are quadratic in the number of keys (minutes for a 23k-tensor header).
class TopLevelKeys : public nlohmann::json_sax<json> {
 public:
  std::string duplicate;

  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override { return ++depth_, true; }
  bool end_object() override { return --depth_, true; }
  bool start_array(std::size_t) override { return ++depth_, true; }
  bool end_array() override { return --depth_, true; }
  bool key(string_t& key) override {
    if (depth_ == 1 && !keys_.insert(key).second) {
      duplicate = key;
      return false;  // stop: one is enough to report
    }
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override { return false; }

 private:
  int depth_ = 0;
  std::set<std::string> keys_;
};

json parse_json_rejecting_duplicates(std::string_view text, const std::string& origin) {
  json header;
  try {
    header = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    fail("{}: safetensors header is not valid JSON ({})", origin, e.what());
  }
  TopLevelKeys keys;
  json::sax_parse(text.begin(), text.end(), &keys);
  if (!keys.duplicate.empty()) fail("{}: safetensors header lists '{}' twice", origin, keys.duplicate);
  return header;
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t dim : shape) n *= dim;
  return n;
}

std::vector<TensorInfo> parse_header(std::string_view header_json, uint64_t data_size, const std::string& origin,
                                     std::map<std::string, std::string>* metadata) {
  if (header_json.size() > kMaxHeaderBytes)
    fail("{}: safetensors header of {} bytes exceeds the {} byte limit", origin, header_json.size(), kMaxHeaderBytes);
  const json header = parse_json_rejecting_duplicates(header_json, origin);
  if (!header.is_object()) fail("{}: safetensors header is not a JSON object", origin);

  std::vector<TensorInfo> tensors;
  tensors.reserve(header.size());
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      if (!value.is_object()) fail("{}: __metadata__ is not an object", origin);
      for (const auto& [meta_key, meta_value] : value.items()) {
        if (!meta_value.is_string()) fail("{}: __metadata__ value '{}' is not a string", origin, meta_key);
        if (metadata) (*metadata)[meta_key] = meta_value.get<std::string>();
      }
      continue;
    }
    tensors.push_back(parse_tensor_entry(key, value, origin));
  }

  std::sort(tensors.begin(), tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected_begin = 0;
  for (const auto& tensor : tensors) {
    if (tensor.begin < expected_begin)
      fail("{}: tensor '{}' at [{}, {}) overlaps the previous tensor (which ends at {})", origin, tensor.name,
           tensor.begin, tensor.end, expected_begin);
    if (tensor.begin > expected_begin)
      fail("{}: tensor '{}' starts at {} but the previous tensor ends at {} (gap in the data section)", origin,
           tensor.name, tensor.begin, expected_begin);
    if (tensor.end > data_size)
      fail("{}: tensor '{}' ends at byte {} of a data section of only {} bytes (file truncated?)", origin, tensor.name,
           tensor.end, data_size);
    expected_begin = tensor.end;
  }
  if (expected_begin != data_size)
    fail("{}: the tensors cover {} bytes but the data section has {} bytes", origin, expected_begin, data_size);
  return tensors;
}

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : path_(path) {
  const std::string origin = path.string();
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("{}: cannot open ({})", origin, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail("{}: cannot stat ({})", origin, std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("{}: not a regular file", origin);
  }
  file_size_ = static_cast<uint64_t>(st.st_size);
  if (file_size_ < 8) {
    ::close(fd);
    fail("{}: {} bytes is too short for a safetensors file (needs an 8-byte header length)", origin, file_size_);
  }
  void* mapping = ::mmap(nullptr, file_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);
  if (mapping == MAP_FAILED) fail("{}: cannot mmap ({})", origin, std::strerror(map_errno));
  mapping_ = static_cast<const uint8_t*>(mapping);

  try {
    uint64_t header_size = 0;
    for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | mapping_[i];
    if (header_size > kMaxHeaderBytes)
      fail("{}: header length {} exceeds the {} byte limit (not a safetensors file?)", origin, header_size,
           kMaxHeaderBytes);
    if (header_size > file_size_ - 8)
      fail("{}: header length {} is larger than the {} bytes that follow it (truncated or not safetensors)", origin,
           header_size, file_size_ - 8);
    data_offset_ = 8 + header_size;
    const std::string_view header(reinterpret_cast<const char*>(mapping_ + 8), header_size);
    tensors_ = parse_header(header, file_size_ - data_offset_, origin, &metadata_);
  } catch (...) {
    ::munmap(const_cast<uint8_t*>(mapping_), file_size_);
    mapping_ = nullptr;
    throw;
  }
  for (const auto& tensor : tensors_) by_name_.emplace(tensor.name, &tensor);
  // Weights are read once, mostly sequentially; tell the kernel so it reads ahead.
  ::madvise(const_cast<uint8_t*>(mapping_), file_size_, MADV_SEQUENTIAL);
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_) ::munmap(const_cast<uint8_t*>(mapping_), file_size_);
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

std::span<const uint8_t> SafetensorsFile::data(const TensorInfo& tensor) const {
  return {mapping_ + data_offset_ + tensor.begin, tensor.nbytes()};
}

}  // namespace mxlm::io
