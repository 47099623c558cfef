// What `mxlm inspect` reports about a model directory, as a library call: a JSON report (the single source
// of truth; `--json` prints it) and its human-readable rendering. Also re-saving a checkpoint through our
// writer, which the interoperability tests use to compare our files byte for byte with Python's.
#pragma once

#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

#include "io/safetensors.h"

namespace mxlm::io {

// A module `<m>` is MXFP4 when `<m>.weight` is U8 and `<m>.weight_scale` exists (quark_mxfp4_format.md §1).
bool is_mxfp4_module(const Checkpoint& checkpoint, const std::string& module);

// Report keys: model_dir, config (summary or null), quantization_config (summary or null), num_files,
// num_tensors, total_bytes, dtypes {NAME: {tensors, bytes}}, mxfp4 {modules, layers, patterns, problems},
// metadata (of the first file), tensors [{name, dtype, shape, file, data_offsets}] when with_tensors.
nlohmann::json inspect_model_dir(const std::filesystem::path& model_dir, bool with_tensors);
std::string format_inspect_report(const nlohmann::json& report);

// Writes every tensor of `checkpoint` into `out_dir` (shards of at most max_shard_bytes, tensors ordered per
// shard as the Python package orders them, metadata of the first input file kept) plus an index when sharded.
void resave_checkpoint(const Checkpoint& checkpoint, const std::filesystem::path& out_dir, uint64_t max_shard_bytes);

}  // namespace mxlm::io
