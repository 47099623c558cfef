// File-to-file MXFP4 quantization of a Hugging Face checkpoint in AMD Quark's export format, streaming: the
// output tensors and shards are planned first (deterministically), then worker threads quantize or copy input
// tensors chunk by chunk, straight from the memory-mapped input into the output shards at fixed offsets.
// Memory stays at a few chunks per thread whatever the model size.
//
// Safety: never writes into the input; refuses a non-empty output unless it holds an unfinished run of the
// same job (resumed: completed shards are kept after their recorded xxh3 checksums are re-verified) or
// `overwrite` is set. Shards appear only complete (written as .partial, fsynced, renamed); the index and
// config.json are written last, so an interrupted or failed run never looks like a finished checkpoint.
#pragma once

#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "quant/plan.h"

namespace mxlm::quant {

struct QuantizeOptions {
  std::filesystem::path model_dir;
  std::filesystem::path output_dir;
  std::string template_name;  // empty: the built-in template named like config.json's model_type, else "default"
  std::string scheme = "mxfp4";
  std::optional<std::vector<std::string>> exclude_layers;  // replaces the template's list when set (as Quark)
  uint64_t max_shard_bytes = 5'000'000'000;
  int threads = 0;  // 0: all cores
  bool skip_incompatible = false;
  bool dry_run = false;
  bool overwrite = false;
  bool verify = false;
  bool progress = true;  // progress bar on stderr (drawn only when it is a terminal)
  // Test hook simulating an interruption: fail with an Error once this many shards were committed.
  size_t stop_after_shards = std::numeric_limits<size_t>::max();
};

struct QuantizeResult {
  QuantPlan plan;
  std::string template_name;
  std::vector<std::string> exclude_patterns;
  size_t shards_total = 0;
  size_t shards_written = 0;
  size_t shards_resumed = 0;
  uint64_t bytes_written = 0;  // shard file bytes written by this run
  double seconds = 0;
  bool verified = false;
};

QuantizeResult quantize_checkpoint(const QuantizeOptions& options);

struct VerifyResult {
  size_t quantized = 0;
  size_t copied = 0;
  uint64_t bytes_checked = 0;
};

// Re-reads a quantized output and checks it against its input: every quantized tensor (one with a
// `.weight_scale` next to it) is re-quantized from the input and compared byte for byte, every other tensor is
// byte-compared, no tensor is missing or extra, and config.json's `exclude` names exactly the unquantized linear
// modules. Error describing the first mismatch.
VerifyResult verify_quantized(const std::filesystem::path& model_dir, const std::filesystem::path& output_dir,
                              int threads = 0, bool progress = false);

// Name of the resume manifest kept in the output directory while a run is unfinished.
inline constexpr const char* kManifestName = ".mxlm-quantize-progress.json";

}  // namespace mxlm::quant
