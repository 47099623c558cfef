#include "quant/quantizer.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "io/safetensors.h"
#include "mx/mxfp4.h"
#include "quant/parallel.h"
#include "quant/quark_config.h"
#include "quant/rows.h"
#include "quant/template.h"

namespace mxlm::quant {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// Bumped whenever the bytes this quantizer writes for the same input and options could change; part of the
// resume fingerprint so a newer binary never keeps shards of an older one.
constexpr std::string_view kWriterVersion = "mxlm-quantize-1";
constexpr uint64_t kChunkBytes = 8ull << 20;       // input bytes per quantize work item
constexpr uint64_t kCopyChunkBytes = 32ull << 20;  // bytes per copy work item
constexpr const char* kIndexName = "model.safetensors.index.json";

int resolve_threads(int threads) {
  if (threads > 0) return threads;
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

std::string read_text_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open", path.string());
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// The address range the reader mapped for a file (the whole file, from a page-aligned start), derived from its
// tensors: they tile the data section, which ends the file.
struct Mapping {
  uintptr_t begin = 0, end = 0;
};

Mapping mapping_of(const io::SafetensorsFile& file) {
  if (file.tensors().empty()) return {};
  static const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto& first = file.tensors().front();
  const uint64_t data_offset = file.file_size() - file.tensors().back().end;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(file.data(first).data()) - first.begin - data_offset;
  return {begin, (begin + file.file_size() + page - 1) / page * page};
}

// Drops the pages of an input range from this process (they stay in the page cache): without this, RSS would
// grow with every mmapped byte read, up to the whole model. The range is widened to whole 2 MiB blocks (within
// the file's mapping) because the kernel may map file pages as transparent huge pages, and a partly covered huge
// mapping stays resident. Widening is safe: the mapping is read-only and file-backed, so a neighbouring chunk
// still being read by another thread just faults its pages back in from the page cache.
void release_pages(const Mapping& mapping, const uint8_t* begin, size_t size) {
  constexpr uintptr_t kBlock = uintptr_t{2} << 20;
  if (size == 0 || mapping.end == 0) return;
  const uintptr_t b = std::max(mapping.begin, reinterpret_cast<uintptr_t>(begin) / kBlock * kBlock);
  const uintptr_t e = std::min(mapping.end, (reinterpret_cast<uintptr_t>(begin) + size + kBlock - 1) / kBlock * kBlock);
  if (e > b) ::madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
}

void prefetch_pages(const uint8_t* begin, size_t size) {
  static const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t b = reinterpret_cast<uintptr_t>(begin) / page * page;
  const uintptr_t e = reinterpret_cast<uintptr_t>(begin) + size;
  if (e > b) ::madvise(reinterpret_cast<void*>(b), e - b, MADV_WILLNEED);
}

std::string hex64(uint64_t v) { return fmt::format("{:016x}", v); }

// xxh3-64 of a whole file, read with pread in large blocks.
std::string file_checksum(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("{}: cannot open ({})", path.string(), std::strerror(errno));
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(), XXH3_freeState);
  XXH3_64bits_reset(state.get());
  std::vector<uint8_t> buffer(8 << 20);
  uint64_t offset = 0;
  for (;;) {
    const ssize_t n = ::pread(fd, buffer.data(), buffer.size(), static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      fail("{}: read failed ({})", path.string(), std::strerror(err));
    }
    if (n == 0) break;
    XXH3_64bits_update(state.get(), buffer.data(), static_cast<size_t>(n));
    offset += static_cast<uint64_t>(n);
  }
  ::close(fd);
  return hex64(XXH3_64bits_digest(state.get()));
}

bool is_readme(const std::string& name) {
  std::string lower = name;
  for (auto& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return lower.size() >= 3 && lower.substr(lower.size() - 3) == ".md" && lower.find("readme") != std::string::npos;
}

// Files written by the quantizer itself (never copied from the input, removed by --overwrite).
bool is_output_owned(const std::string& name) {
  return name == kIndexName || name == "config.json" || name == kManifestName || name.ends_with(".safetensors") ||
         name.ends_with(".safetensors.partial");
}

// Copies every non-weight file and folder (tokenizer, chat template, generation config, processor configs,
// remote code, ...) as Quark's _copy_json_and_py_files does: all but *.safetensors and README markdown. The
// index and config.json are written by the quantizer.
void copy_aux_files(const fs::path& from, const fs::path& to) {
  for (const auto& entry : fs::directory_iterator(from)) {
    const std::string name = entry.path().filename().string();
    if (name.ends_with(".safetensors") || name == kIndexName || name == "config.json" || name == kManifestName ||
        is_readme(name))
      continue;
    const fs::path target = to / name;
    if (entry.is_directory()) {
      fs::copy(entry.path(), target, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
    } else if (entry.is_regular_file()) {
      fs::path temp = target;
      temp += ".tmp";
      fs::copy_file(entry.path(), temp, fs::copy_options::overwrite_existing);
      fs::rename(temp, target);
    }
  }
}

bool is_inside(const fs::path& child, const fs::path& parent) {
  auto c = child.begin();
  for (auto p = parent.begin(); p != parent.end(); ++p, ++c) {
    if (c == child.end() || *c != *p) return false;
  }
  return true;
}

// Input tensors in storage order (shard by shard, by offset). Every tensor of every shard must be listed by the
// index: a shard with tensors the index does not know is an inconsistent checkpoint, not something to drop.
std::vector<io::TensorInfo> input_tensors(const io::Checkpoint& checkpoint) {
  std::vector<io::TensorInfo> tensors;
  for (const auto& file : checkpoint.files()) {
    for (const auto& t : file->tensors()) {
      if (!checkpoint.contains(t.name) || &checkpoint.file_of(t.name) != file.get())
        fail("{}: tensor '{}' of {} is missing from {} (incomplete index?)", checkpoint.dir().string(), t.name,
             file->path().filename().string(), kIndexName);
      tensors.push_back(t);
    }
  }
  return tensors;
}

uint64_t fingerprint(const std::vector<io::ShardPlan>& shards, const io::Checkpoint& checkpoint,
                     const std::string& config_json) {
  std::string text(kWriterVersion);
  for (const auto& file : checkpoint.files()) {
    struct stat st {};
    ::stat(file->path().c_str(), &st);
    text += fmt::format("|in:{}:{}:{}.{}", file->path().filename().string(), file->file_size(),
                        static_cast<long long>(st.st_mtim.tv_sec), static_cast<long>(st.st_mtim.tv_nsec));
  }
  for (const auto& shard : shards) {
    text += "|out:" + shard.file_name;
    for (const auto& t : shard.tensors)
      text += fmt::format(";{}:{}:{}", t.name, dtype_name(t.dtype), fmt::join(t.shape, "x"));
  }
  text += "|config:" + config_json;
  return XXH3_64bits(text.data(), text.size());
}

struct Manifest {
  std::string fingerprint;
  std::map<std::string, std::pair<uint64_t, std::string>> shards;  // file -> (size, xxh3)

  std::string dump() const {
    json j;
    j["writer"] = std::string(kWriterVersion);
    j["fingerprint"] = fingerprint;
    j["completed_shards"] = json::object();
    for (const auto& [file, entry] : shards)
      j["completed_shards"][file] = {{"size", entry.first}, {"xxh3", entry.second}};
    return j.dump(2) + "\n";
  }

  static std::optional<Manifest> load(const fs::path& path) {
    if (!fs::exists(path)) return std::nullopt;
    try {
      const json j = json::parse(read_text_file(path));
      Manifest m;
      m.fingerprint = j.at("fingerprint").get<std::string>();
      for (const auto& [file, entry] : j.at("completed_shards").items())
        m.shards[file] = {entry.at("size").get<uint64_t>(), entry.at("xxh3").get<std::string>()};
      return m;
    } catch (const json::exception& e) {
      spdlog::warn("{}: unreadable resume manifest ignored ({})", path.string(), e.what());
      return Manifest{};
    }
  }
};

// One unit of work: rows [begin, end) of a tensor to quantize, or bytes [begin, end) of a tensor to copy.
struct WorkItem {
  size_t tensor;
  uint64_t begin, end;
};

struct OutputLocation {
  size_t shard = 0;
  bool pending = true;  // false when its shard was resumed
};

class ShardSlot {
 public:
  std::mutex mutex;
  std::unique_ptr<io::SafetensorsWriter> writer;
  std::atomic<size_t> remaining{0};
};

void prepare_output_dir(const QuantizeOptions& options, const fs::path& out, const std::string& fp,
                        std::optional<Manifest>& manifest) {
  if (!fs::exists(out)) {
    fs::create_directories(out);
    return;
  }
  if (!fs::is_directory(out)) fail("output '{}' exists and is not a directory", out.string());
  const bool empty = fs::directory_iterator(out) == fs::directory_iterator();
  if (empty) return;
  if (options.overwrite) {
    for (const auto& entry : fs::directory_iterator(out)) {
      const std::string name = entry.path().filename().string();
      if (is_output_owned(name) && !entry.is_directory()) fs::remove(entry.path());
    }
    return;
  }
  manifest = Manifest::load(out / kManifestName);
  if (!manifest)
    fail("output directory '{}' is not empty; pass --overwrite to replace its checkpoint files", out.string());
  if (manifest->fingerprint != fp)
    fail(
        "output directory '{}' holds an unfinished quantization of a different input or with different options; "
        "pass --overwrite to start over",
        out.string());
}

}  // namespace

QuantizeResult quantize_checkpoint(const QuantizeOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  QuantizeResult result;
  if (!is_supported_scheme(options.scheme))
    fail("unsupported quantization scheme '{}' (supported: mxfp4)", options.scheme);
  if (!fs::is_directory(options.model_dir)) fail("model directory '{}' does not exist", options.model_dir.string());
  const fs::path in = fs::weakly_canonical(fs::absolute(options.model_dir));
  if (options.output_dir.empty() && !options.dry_run) fail("no output directory given");
  const fs::path out = options.output_dir.empty() ? fs::path() : fs::weakly_canonical(fs::absolute(options.output_dir));
  if (!options.dry_run) {
    if (out == in) fail("output directory '{}' is the input directory; refusing to write into the input", out.string());
    if (is_inside(out, in)) fail("output directory '{}' is inside the input directory '{}'", out.string(), in.string());
  }

  const fs::path config_path = in / "config.json";
  if (!fs::exists(config_path)) fail("{}: no config.json (needed to write quantization_config)", in.string());
  const std::string config_text = read_text_file(config_path);
  std::string model_type;
  try {
    const json config = json::parse(config_text);
    if (config.is_object() && config.contains("model_type") && config["model_type"].is_string())
      model_type = config["model_type"].get<std::string>();
  } catch (const json::exception& e) {
    fail("{}: not valid JSON ({})", config_path.string(), e.what());
  }

  std::string template_name = options.template_name;
  if (template_name.empty()) {
    template_name = "default";
    for (const auto& t : builtin_templates())
      if (t.model_type == model_type) template_name = model_type;
  }
  const QuantTemplate& tmpl = find_template(template_name);
  result.template_name = tmpl.model_type;
  result.exclude_patterns = effective_excludes(tmpl, options.exclude_layers);

  const io::Checkpoint checkpoint(in);
  result.plan = make_plan(input_tensors(checkpoint), {result.exclude_patterns, options.skip_incompatible});
  const QuantPlan& plan = result.plan;

  std::vector<io::ShardPlan> shards = io::plan_shards(plan.output_tensors(), options.max_shard_bytes);
  for (auto& shard : shards) io::sort_for_alignment(shard.tensors);
  result.shards_total = shards.size();
  const std::string output_config =
      quantized_config_json(config_text, quark_mxfp4_quantization_config(plan.excluded_modules), config_path.string());
  if (options.dry_run) return result;

  const std::string fp = hex64(fingerprint(shards, checkpoint, output_config));
  std::optional<Manifest> previous;
  prepare_output_dir(options, out, fp, previous);
  // A finished output from an earlier run of this job is being redone: make it look unfinished first.
  fs::remove(out / "config.json");
  fs::remove(out / kIndexName);

  Manifest manifest;
  manifest.fingerprint = fp;
  std::vector<bool> shard_done(shards.size(), false);
  if (previous) {
    for (size_t s = 0; s < shards.size(); ++s) {
      auto it = previous->shards.find(shards[s].file_name);
      if (it == previous->shards.end()) continue;
      const fs::path path = out / shards[s].file_name;
      if (fs::exists(path) && fs::file_size(path) == it->second.first && file_checksum(path) == it->second.second) {
        shard_done[s] = true;
        manifest.shards[shards[s].file_name] = it->second;
        ++result.shards_resumed;
      } else {
        spdlog::warn("{}: does not match its recorded checksum; writing it again", path.string());
      }
    }
    if (result.shards_resumed)
      spdlog::info("resuming: {} of {} shards already complete", result.shards_resumed, shards.size());
  }
  const fs::path manifest_path = out / kManifestName;
  io::write_file_atomic(manifest_path, manifest.dump());

  // Where each output tensor goes.
  std::map<std::string, OutputLocation, std::less<>> location;
  for (size_t s = 0; s < shards.size(); ++s)
    for (const auto& t : shards[s].tensors) location[t.name] = {s, !shard_done[s]};

  // Work items, in input order, and how many items each pending shard waits for.
  std::vector<ShardSlot> slots(shards.size());
  std::vector<WorkItem> items;
  uint64_t resumed_bytes = 0;
  for (size_t i = 0; i < plan.tensors.size(); ++i) {
    const TensorPlan& t = plan.tensors[i];
    std::vector<size_t> targets;
    const OutputLocation& main = location.at(t.name);
    if (main.pending) targets.push_back(main.shard);
    if (t.action == TensorAction::Quantize) {
      const OutputLocation& scale = location.at(t.name + "_scale");
      if (scale.pending && (targets.empty() || targets[0] != scale.shard)) targets.push_back(scale.shard);
    }
    if (targets.empty()) {
      resumed_bytes += t.in_bytes;
      continue;
    }
    uint64_t total, step;
    if (t.action == TensorAction::Quantize) {
      const uint64_t row_bytes = static_cast<uint64_t>(t.cols()) * dtype_size(t.dtype);
      total = static_cast<uint64_t>(t.rows());
      step = std::max<uint64_t>(1, kChunkBytes / row_bytes);
    } else {
      total = t.in_bytes;
      step = kCopyChunkBytes;
    }
    for (uint64_t b = 0; b < total || (b == 0 && total == 0); b += step) {
      items.push_back({i, b, std::min(total, b + step)});
      for (size_t s : targets) ++slots[s].remaining;
      if (total == 0) break;
    }
  }
  // Shards with no tensors to write (possible only for an empty checkpoint) still get committed.
  std::vector<size_t> empty_shards;
  for (size_t s = 0; s < shards.size(); ++s)
    if (!shard_done[s] && slots[s].remaining == 0) empty_shards.push_back(s);

  const int threads = resolve_threads(options.threads);
  spdlog::info("quantizing {} tensors to MXFP4, copying {} ({} -> {}) into {} shard(s) with {} threads",
               plan.quantized_count, plan.copied_count, format_bytes(static_cast<double>(plan.bytes_in)),
               format_bytes(static_cast<double>(plan.bytes_out)), shards.size(), threads);
  Progress progress("quantize", plan.bytes_in, Progress::Unit::Bytes, options.progress);
  progress.advance(resumed_bytes);

  std::mutex manifest_mutex;
  std::atomic<size_t> committed{0};
  std::atomic<uint64_t> bytes_written{0};

  auto writer_for = [&](size_t s) -> io::SafetensorsWriter& {
    std::lock_guard lock(slots[s].mutex);
    if (!slots[s].writer)
      slots[s].writer = std::make_unique<io::SafetensorsWriter>(out / shards[s].file_name, shards[s].tensors);
    return *slots[s].writer;
  };
  auto commit = [&](size_t s) {
    std::unique_ptr<io::SafetensorsWriter> writer;
    {
      std::lock_guard lock(slots[s].mutex);
      if (!slots[s].writer)
        slots[s].writer = std::make_unique<io::SafetensorsWriter>(out / shards[s].file_name, shards[s].tensors);
      writer = std::move(slots[s].writer);
    }
    writer->commit();
    const fs::path path = out / shards[s].file_name;
    const uint64_t size = writer->file_size();
    writer.reset();
    const std::string sum = file_checksum(path);
    bytes_written += size;
    {
      std::lock_guard lock(manifest_mutex);
      manifest.shards[shards[s].file_name] = {size, sum};
      io::write_file_atomic(manifest_path, manifest.dump());
    }
    if (++committed >= options.stop_after_shards)
      fail("quantization interrupted after {} shard(s) (test hook)", committed.load());
  };
  auto finish_target = [&](size_t s) {
    if (--slots[s].remaining == 0) commit(s);
  };

  for (size_t s : empty_shards) commit(s);
  parallel_for(items.size(), threads, [&](size_t k) {
    thread_local std::vector<uint8_t> packed, scales;
    const WorkItem& item = items[k];
    const TensorPlan& t = plan.tensors[item.tensor];
    const std::span<const uint8_t> src = checkpoint.data(t.name);
    const OutputLocation& main = location.at(t.name);
    if (t.action == TensorAction::Copy) {
      const uint8_t* p = src.data() + item.begin;
      const size_t n = item.end - item.begin;
      prefetch_pages(p, n);
      if (main.pending) writer_for(main.shard).write_part(t.name, item.begin, {p, n});
      release_pages(mapping_of(checkpoint.file_of(t.name)), p, n);
      progress.advance(n);
      if (main.pending) finish_target(main.shard);
      return;
    }
    const size_t k_dim = static_cast<size_t>(t.cols()), rows = item.end - item.begin;
    const size_t row_bytes = k_dim * dtype_size(t.dtype);
    const uint8_t* p = src.data() + item.begin * row_bytes;
    prefetch_pages(p, rows * row_bytes);
    packed.resize(rows * k_dim / 2);
    scales.resize(rows * (k_dim / mx::kBlockSize));
    quantize_rows(t.name, t.dtype, p, item.begin, rows, k_dim, packed.data(), scales.data());
    release_pages(mapping_of(checkpoint.file_of(t.name)), p, rows * row_bytes);
    const OutputLocation& scale = location.at(t.name + "_scale");
    if (main.pending) writer_for(main.shard).write_part(t.name, item.begin * (k_dim / 2), packed);
    if (scale.pending)
      writer_for(scale.shard).write_part(t.name + "_scale", item.begin * (k_dim / mx::kBlockSize), scales);
    progress.advance(rows * row_bytes);
    if (main.pending) finish_target(main.shard);
    if (scale.pending && !(main.pending && main.shard == scale.shard)) finish_target(scale.shard);
  });
  progress.finish();
  result.shards_written = committed.load();
  result.bytes_written = bytes_written.load();

  // Everything else, then the index, then config.json: only now does the output look like a checkpoint.
  copy_aux_files(in, out);
  io::write_index(out, shards);
  io::write_file_atomic(out / "config.json", output_config);
  fs::remove(manifest_path);
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  if (options.verify) {
    verify_quantized(in, out, threads, options.progress);
    result.verified = true;
  }
  return result;
}

VerifyResult verify_quantized(const fs::path& model_dir, const fs::path& output_dir, int threads, bool show_progress) {
  const io::Checkpoint input(model_dir);
  const io::Checkpoint output(output_dir);
  const std::vector<io::TensorInfo> tensors = input_tensors(input);

  const fs::path config_path = output_dir / "config.json";
  if (!fs::exists(config_path)) fail("{}: no config.json (the output is incomplete)", output_dir.string());
  json qc;
  try {
    qc = json::parse(read_text_file(config_path)).at("quantization_config");
  } catch (const json::exception& e) {
    fail("{}: no readable quantization_config ({})", config_path.string(), e.what());
  }
  if (!qc.is_object() || qc.value("quant_method", "") != "quark")
    fail("{}: quantization_config.quant_method is not \"quark\"", config_path.string());
  std::set<std::string> exclude;
  for (const auto& e : qc.value("exclude", json::array())) exclude.insert(e.get<std::string>());

  // Expected output tensors and the consistency of `exclude` with what was quantized.
  VerifyResult result;
  std::set<std::string> expected;
  std::vector<bool> quantized(tensors.size(), false);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    expected.insert(t.name);
    const std::string scale_name = t.name + "_scale";
    const bool linear = is_linear_weight_name(t.name) && t.shape.size() >= 2;
    if (output.contains(scale_name) && !input.contains(scale_name)) {
      quantized[i] = true;
      expected.insert(scale_name);
      if (t.shape.size() != 2 || t.shape[1] % static_cast<int64_t>(mx::kBlockSize) != 0)
        fail("output has '{}' but input '{}' is not a 2-D weight with K % 32 == 0", scale_name, t.name);
      const auto& w = output.info(t.name);
      const auto& s = output.info(scale_name);
      const std::vector<int64_t> ws{t.shape[0], t.shape[1] / 2}, ss{t.shape[0], t.shape[1] / 32};
      if (w.dtype != DType::U8 || w.shape != ws || s.dtype != DType::U8 || s.shape != ss)
        fail("quantized tensor '{}' has the wrong dtype or shape in the output", t.name);
      if (exclude.count(module_name_of(t.name)))
        fail("'{}' is quantized but config.json excludes module '{}'", t.name, module_name_of(t.name));
      ++result.quantized;
    } else {
      if (!output.contains(t.name)) fail("output is missing tensor '{}'", t.name);
      const auto& o = output.info(t.name);
      if (o.dtype != t.dtype || o.shape != t.shape)
        fail("tensor '{}' changed dtype or shape: {} {} -> {} {}", t.name, dtype_name(t.dtype), fmt::join(t.shape, "x"),
             dtype_name(o.dtype), fmt::join(o.shape, "x"));
      if (linear && !exclude.count(module_name_of(t.name)))
        fail("linear weight '{}' is not quantized but config.json does not exclude module '{}'", t.name,
             module_name_of(t.name));
      ++result.copied;
    }
  }
  for (const auto& name : output.tensor_names())
    if (!expected.count(name)) fail("output has unexpected tensor '{}'", name);

  std::vector<WorkItem> items;
  uint64_t total_bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    total_bytes += t.nbytes();
    if (quantized[i]) {
      const uint64_t rows = static_cast<uint64_t>(t.shape[0]);
      const uint64_t step =
          std::max<uint64_t>(1, kChunkBytes / (static_cast<uint64_t>(t.shape[1]) * dtype_size(t.dtype)));
      for (uint64_t b = 0; b < rows; b += step) items.push_back({i, b, std::min(rows, b + step)});
    } else {
      for (uint64_t b = 0; b < t.nbytes() || b == 0; b += kCopyChunkBytes) {
        items.push_back({i, b, std::min(t.nbytes(), b + kCopyChunkBytes)});
        if (t.nbytes() == 0) break;
      }
    }
  }
  Progress progress("verify", total_bytes, Progress::Unit::Bytes, show_progress);
  parallel_for(items.size(), resolve_threads(threads), [&](size_t k) {
    thread_local std::vector<uint8_t> packed, scales;
    const WorkItem& item = items[k];
    const auto& t = tensors[item.tensor];
    const std::span<const uint8_t> src = input.data(t.name);
    if (!quantized[item.tensor]) {
      const std::span<const uint8_t> dst = output.data(t.name);
      const size_t n = item.end - item.begin;
      if (std::memcmp(src.data() + item.begin, dst.data() + item.begin, n) != 0) {
        size_t j = 0;
        while (src[item.begin + j] == dst[item.begin + j]) ++j;
        fail("tensor '{}' differs from the input at byte {}", t.name, item.begin + j);
      }
      release_pages(mapping_of(input.file_of(t.name)), src.data() + item.begin, n);
      release_pages(mapping_of(output.file_of(t.name)), dst.data() + item.begin, n);
      progress.advance(n);
      return;
    }
    const size_t kd = static_cast<size_t>(t.shape[1]), rows = item.end - item.begin;
    const size_t row_bytes = kd * dtype_size(t.dtype);
    packed.resize(rows * kd / 2);
    scales.resize(rows * (kd / mx::kBlockSize));
    quantize_rows(t.name, t.dtype, src.data() + item.begin * row_bytes, item.begin, rows, kd, packed.data(),
                  scales.data());
    const uint8_t* w = output.data(t.name).data() + item.begin * (kd / 2);
    const uint8_t* s = output.data(t.name + "_scale").data() + item.begin * (kd / mx::kBlockSize);
    if (std::memcmp(w, packed.data(), packed.size()) != 0)
      fail("quantized tensor '{}' differs from a re-quantization of the input (rows {}..{})", t.name, item.begin,
           item.end);
    if (std::memcmp(s, scales.data(), scales.size()) != 0)
      fail("scales of '{}' differ from a re-quantization of the input (rows {}..{})", t.name, item.begin, item.end);
    release_pages(mapping_of(input.file_of(t.name)), src.data() + item.begin * row_bytes, rows * row_bytes);
    release_pages(mapping_of(output.file_of(t.name)), w, packed.size());
    release_pages(mapping_of(output.file_of(t.name + "_scale")), s, scales.size());
    progress.advance(rows * row_bytes);
  });
  progress.finish();
  result.bytes_checked = total_bytes;
  return result;
}

}  // namespace mxlm::quant
