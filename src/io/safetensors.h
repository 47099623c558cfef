// safetensors files: a memory-mapped reader that validates the header before trusting it, a directory
// view over single-file and sharded (model.safetensors.index.json) checkpoints, and a writer that never
// leaves a file that looks complete but is not (written as "<name>.partial", fsynced, then renamed).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/dtype.h"

namespace mxlm::io {

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets relative to the start of the data section
  uint64_t end = 0;

  uint64_t nbytes() const { return end - begin; }
  int64_t numel() const;
};

// One .safetensors file, mmapped read-only. Every malformed header (too large, not JSON, unknown dtype,
// offsets out of range or overlapping or not matching shape x dtype, truncated data) is an Error that
// names the file and the tensor.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  // Tensors in data-offset order.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(std::string_view name) const;
  std::span<const uint8_t> data(const TensorInfo& tensor) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  uint64_t file_size() const { return file_size_; }

 private:
  std::filesystem::path path_;
  const uint8_t* mapping_ = nullptr;
  uint64_t file_size_ = 0;
  uint64_t data_offset_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, const TensorInfo*, std::less<>> by_name_;
  std::map<std::string, std::string> metadata_;
};

// Header size limit, as in the Rust `safetensors` crate.
inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// Parses and validates a header (the JSON after the 8-byte length) against a data section of `data_size`
// bytes; shared by the reader and the fuzz target. `origin` names the file in errors. Like the Rust
// crate, the tensors must tile the data section exactly: no overlap, no gap, no trailing bytes.
std::vector<TensorInfo> parse_header(std::string_view header_json, uint64_t data_size, const std::string& origin,
                                     std::map<std::string, std::string>* metadata);

// A Hugging Face checkpoint directory: model.safetensors, or shards listed by model.safetensors.index.json
// (every listed shard must exist and hold the tensors the index says), or any *.safetensors files.
class Checkpoint {
 public:
  explicit Checkpoint(const std::filesystem::path& dir);

  const std::filesystem::path& dir() const { return dir_; }
  std::vector<std::string> tensor_names() const;  // sorted
  bool contains(std::string_view name) const;
  const TensorInfo& info(std::string_view name) const;  // Error naming the tensor when missing
  std::span<const uint8_t> data(std::string_view name) const;
  const SafetensorsFile& file_of(std::string_view name) const;
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }
  uint64_t total_bytes() const;

 private:
  std::filesystem::path dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<const SafetensorsFile*, const TensorInfo*>, std::less<>> index_;
};

// What a writer is going to write, known before the first byte so the header can go first and tensors
// can then be written in any order, from several threads, at fixed offsets.
struct PlannedTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t nbytes() const;
};

class SafetensorsWriter {
 public:
  // Creates `<path>.partial` with the header for `tensors` (in the given order) and sizes the file.
  SafetensorsWriter(std::filesystem::path path, std::vector<PlannedTensor> tensors,
                    std::map<std::string, std::string> metadata = {{"format", "pt"}});
  ~SafetensorsWriter();  // removes the .partial file unless commit() succeeded

  // Writes the bytes of a planned tensor (size must match); thread-safe for distinct tensors.
  void write(std::string_view name, std::span<const uint8_t> bytes);
  // Writes part of a tensor at `offset` bytes into it (for streaming a large tensor in pieces).
  void write_part(std::string_view name, uint64_t offset, std::span<const uint8_t> bytes);
  // Checks every tensor was written, fsyncs, renames to the final path and fsyncs the directory.
  void commit();
  uint64_t file_size() const { return file_size_; }

 private:
  std::filesystem::path path_;
  std::filesystem::path partial_path_;
  int fd_ = -1;
  uint64_t data_offset_ = 0;
  uint64_t file_size_ = 0;
  std::vector<PlannedTensor> tensors_;
  std::map<std::string, std::pair<uint64_t, uint64_t>, std::less<>> ranges_;  // name -> [begin, end)
  std::map<std::string, uint64_t, std::less<>> written_;                      // name -> bytes written
  std::mutex mutex_;  // guards written_ (the pwrites themselves go to disjoint ranges)
  bool committed_ = false;
};

// Splits tensors (in order) into shards of at most max_shard_bytes of data each (a larger tensor gets a
// shard of its own), named model-00001-of-0000N.safetensors, or model.safetensors when one shard suffices.
struct ShardPlan {
  std::string file_name;
  std::vector<PlannedTensor> tensors;
  uint64_t data_bytes = 0;
};
std::vector<ShardPlan> plan_shards(const std::vector<PlannedTensor>& tensors, uint64_t max_shard_bytes);

// Reorders tensors as the Python `safetensors` package lays them out (larger element size first, then by
// name), so every tensor's data starts at an offset aligned to its element size.
void sort_for_alignment(std::vector<PlannedTensor>& tensors);

// The header bytes (8-byte little-endian length + JSON padded with spaces to a multiple of 8) that
// SafetensorsWriter writes for `tensors` in the given order; byte-identical to the Python package's.
std::string serialize_header(const std::vector<PlannedTensor>& tensors,
                             const std::map<std::string, std::string>& metadata);

// Writes model.safetensors.index.json ({"metadata": {"total_size": N}, "weight_map": {...}}) atomically.
void write_index(const std::filesystem::path& dir, const std::vector<ShardPlan>& shards);

// Parses "5GB", "500MB", "1.5GiB", "1024" (bytes) as Hugging Face's max_shard_size does.
uint64_t parse_size(std::string_view text);

// Writes a whole small file atomically (temp name, fsync, rename).
void write_file_atomic(const std::filesystem::path& path, std::string_view contents);

}  // namespace mxlm::io
