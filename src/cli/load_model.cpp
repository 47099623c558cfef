// Loading a model on --tensor-parallel-size ranks (model_options.h).
#include <CLI/CLI.hpp>

#include <utility>

#include "backend/cpu/cpu_tp_group.h"
#ifdef MXLM_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif
#include "cli/model_options.h"
#include "core/error.h"

namespace mxlm::cli {

void add_moe_backend_option(CLI::App& cmd, std::string& moe_backend) {
  cmd.add_option("--moe-backend", moe_backend,
                 "MXFP4 experts on cuda: native (the fused kernels) or emulation (dequantize + QDQ + cuBLAS, the "
                 "reference); cpu computes the one exact path")
      ->check(CLI::IsMember({"native", "emulation"}))
      ->capture_default_str();
}

LoadedModel load_model(const std::string& device, const std::string& moe_backend, int tensor_parallel_size,
                       const model::ModelOptions& options, const RankLoader& load, const std::string& kv_cache_dtype) {
  const int tp = tensor_parallel_size;
  if (tp < 1) fail("--tensor-parallel-size must be >= 1, got {}", tp);
  [[maybe_unused]] const DType kv = parse_kv_cache_dtype(kv_cache_dtype, device);  // checked before loading
  LoadedModel lm;
  if (tp == 1) {
    lm.backend = make_backend(device, moe_backend, kv_cache_dtype);
    lm.model = load(*lm.backend, options);
    return lm;
  }
  if (moe_backend != "native" && moe_backend != "emulation")
    fail("--moe-backend must be native or emulation, got '{}'", moe_backend);
  engine::TpRanks::MakeBackend make;
  if (device == "cpu") {
    // Each rank takes its own element; the vector never changes size, so the rank threads can do so concurrently.
    auto all = std::make_shared<std::vector<std::unique_ptr<backend::Backend>>>(backend::cpu::make_cpu_tp_backends(tp));
    make = [all](int rank) { return std::move((*all)[static_cast<size_t>(rank)]); };
  } else if (device == "cuda") {
#ifdef MXLM_HAVE_CUDA
    auto group = backend::make_cuda_tp_group(tp);
    const backend::MoeBackend moe = backend::parse_moe_backend(moe_backend);
    make = [group, moe, kv](int rank) {
      backend::CudaOptions options;  // by name: the struct grows
      options.moe_backend = moe;
      options.kv_cache_dtype = kv;
      options.tp = group;
      options.tp_rank = rank;
      return backend::make_cuda_backend(options);
    };
#else
    fail("--device cuda: this build has no CUDA backend (configure with -DMXLM_CUDA=ON on a machine with nvcc)");
#endif
  } else {
    fail("--device must be cpu or cuda, got '{}'", device);
  }
  auto load_rank = [load, options, tp](backend::Backend& be, int rank) {
    model::ModelOptions o = options;
    o.tp = {rank, tp};
    return load(be, o);
  };
  lm.ranks = std::make_unique<engine::TpRanks>(tp, make, load_rank);
  lm.backend = make(0);
  lm.model = load_rank(*lm.backend, 0);
  return lm;
}

LoadedModel load_model(const std::string& device, const std::string& moe_backend, int tensor_parallel_size,
                       const model::ModelOptions& options, const std::string& model_dir,
                       const std::string& kv_cache_dtype) {
  return load_model(
      device, moe_backend, tensor_parallel_size, options,
      [model_dir](backend::Backend& be, const model::ModelOptions& o) {
        return model::load_m3_model(model_dir, be, o);
      },
      kv_cache_dtype);
}

}  // namespace mxlm::cli
