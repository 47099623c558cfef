// `mxlm logits`: the logits of every position of a token sequence, as a [T, vocab] f32 .npy (NumPy v1.0),
// computed with the same engine path as generation (one prefill step through the paged cache).
#include <CLI/CLI.hpp>

#include <string>
#include <vector>

#include "backend/backend.h"
#ifdef MXLM_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif
#include "cli/model_options.h"
#include "cli/registry.h"
#include "core/error.h"
#include "core/log.h"
#include "engine/model_runner.h"
#include "engine/npy.h"
#include "model/m3_model.h"

namespace mxlm::cli {

std::vector<int32_t> parse_token_list(const std::string& text) {
  std::vector<int32_t> ids;
  size_t p = 0;
  while (p <= text.size()) {
    const size_t q = std::min(text.find(',', p), text.size());
    std::string item = text.substr(p, q - p);
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (item.empty()) fail("--tokens: empty entry in '{}'", text);
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != item.size() || v < 0 || v > INT32_MAX) fail("--tokens: '{}' is not a token id", item);
    ids.push_back(static_cast<int32_t>(v));
    p = q + 1;
  }
  return ids;
}

std::optional<backend::WeightFormat> parse_weight_dtype(const std::string& dtype) {
  if (dtype == "auto") return std::nullopt;
  if (dtype == "float32") return backend::WeightFormat::F32;
  if (dtype == "bfloat16") return backend::WeightFormat::BF16;
  fail("--dtype must be auto, float32 or bfloat16, got '{}'", dtype);
}

DType parse_kv_cache_dtype(const std::string& kv_cache_dtype, const std::string& device) {
  if (kv_cache_dtype == "auto" || kv_cache_dtype == "float32") return DType::F32;
  if (kv_cache_dtype != "bfloat16")
    fail("--kv-cache-dtype must be auto, float32 or bfloat16, got '{}'", kv_cache_dtype);
  if (device != "cuda")
    fail("--kv-cache-dtype bfloat16 needs --device cuda (the CPU backend keeps its KV cache in float32)");
  return DType::BF16;
}

std::unique_ptr<backend::Backend> make_backend(const std::string& device, const std::string& moe_backend,
                                               const std::string& kv_cache_dtype) {
  if (moe_backend != "native" && moe_backend != "emulation")
    fail("--moe-backend must be native or emulation, got '{}'", moe_backend);
  [[maybe_unused]] const DType kv = parse_kv_cache_dtype(kv_cache_dtype, device);  // checked on every device
  if (device == "cpu") return backend::make_cpu_backend();
  if (device == "cuda") {
#ifdef MXLM_HAVE_CUDA
    backend::CudaOptions options;
    options.moe_backend = backend::parse_moe_backend(moe_backend);
    options.kv_cache_dtype = kv;
    return backend::make_cuda_backend(options);
#else
    fail("--device cuda: this build has no CUDA backend (configure with -DMXLM_CUDA=ON on a machine with nvcc)");
#endif
  }
  fail("--device must be cpu or cuda, got '{}'", device);
}

std::unique_ptr<backend::Backend> make_backend(const std::string& device) { return make_backend(device, "native"); }

namespace {

struct LogitsOptions {
  std::string model;
  std::string tokens;
  std::string output;
  std::string device = "cpu";
  std::string dtype = "auto";
  std::string kv_cache_dtype = "auto";
  std::string moe_backend = kDefaultMoeBackend;
  bool enforce_eager = false;  // decode steps never as CUDA graphs
  int tensor_parallel_size = 1;
};

void run_logits(const LogitsOptions& o) {
  const auto ids = parse_token_list(o.tokens);
  model::ModelOptions mo;
  mo.float_format = parse_weight_dtype(o.dtype);
  mo.step_graphs = o.enforce_eager ? model::StepGraphs::Off : model::StepGraphs::On;  // on cuda
  LoadedModel lm = load_model(o.device, o.moe_backend, o.tensor_parallel_size, mo, o.model, o.kv_cache_dtype);
  auto& model = lm.model;
  engine::CacheConfig cc = engine::cache_config_for(*model, static_cast<int32_t>(ids.size()));
  cc.prefix_caching = false;
  engine::ModelRunner runner(*model, cc);
  lm.attach(runner);
  engine::Sequence seq;
  seq.tokens = ids;
  runner.admit(seq);
  engine::StepItem item{&seq, static_cast<int32_t>(ids.size()), true};
  const auto out = runner.step({&item, 1});
  engine::write_npy_f32(o.output, {static_cast<int64_t>(ids.size()), out.vocab}, out.logits.data());
  spdlog::info("wrote logits [{}, {}] to {}", ids.size(), out.vocab, o.output);
}

void add_logits(CLI::App& app) {
  auto opts = std::make_shared<LogitsOptions>();
  auto* cmd = app.add_subcommand("logits", "Write the logits of every position of a token sequence to a .npy file");
  cmd->add_option("--model", opts->model, "Model directory (config.json + safetensors)")->required();
  cmd->add_option("--tokens", opts->tokens, "Comma-separated token ids, e.g. 1,2,3")->required();
  cmd->add_option("--output", opts->output, "Output .npy file ([T, vocab] float32)")->required();
  cmd->add_option("--device", opts->device, "cpu|cuda")->capture_default_str();
  cmd->add_option("--dtype", opts->dtype, "Weight storage: auto (as in the checkpoint), float32 or bfloat16")
      ->capture_default_str();
  add_moe_backend_option(*cmd, opts->moe_backend);
  cmd->add_option("--kv-cache-dtype", opts->kv_cache_dtype,
                  "KV cache element: auto (float32), float32, bfloat16 (cuda)")
      ->capture_default_str();
  cmd->add_flag("--enforce-eager", opts->enforce_eager,
                "Run decode steps eagerly (default on cuda: captured once per batch size as CUDA graphs and replayed)");
  cmd->add_option("--tensor-parallel-size", opts->tensor_parallel_size,
                  "Ranks the model is sharded over (threads on cpu, GPUs 0..N-1 with NCCL on cuda)")
      ->capture_default_str();
  cmd->callback([opts] { run_logits(*opts); });
}

const bool registered = register_command("logits", add_logits);

}  // namespace
}  // namespace mxlm::cli
