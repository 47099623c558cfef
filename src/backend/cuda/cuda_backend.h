// The CUDA implementation of backend::Backend (sm_90a; one GPU per backend, several GPUs as NCCL tensor-parallel
// ranks). Buffers are device memory from a caching pool; every op is enqueued on one stream and download()
// synchronises. Activations stay f32 at the interface (backend.h); matrix products feed bf16 tensor cores:
//   - F32 weights: cuBLAS SGEMM (no TF32), the exact f32 path the fixtures are checked against;
//   - BF16 weights: activations rounded to bf16, cuBLAS bf16 GEMM with f32 accumulation;
//   - F16 weights: widened to f32 at upload;
//   - MXFP4 weights: native (default) = the fused in-register-dequant tensor-core kernel for M <= 16 and, for
//     larger M, the weights dequantized into a pooled bf16 tile buffer feeding cuBLAS; emulation = vLLM's path
//     (whole weight dequantized to bf16, cuBLAS bf16) at every M. The model QDQs MXFP4 inputs before linear(),
//     so their bf16 conversion is exact and both paths compute the emulation math up to f32 summation order.
//   - moe_experts: tokens sorted by expert on the host (ids are downloaded), QDQ fused into the gather and into
//     the SwiGLU, then grouped fused kernels (native) or per-expert dequantize + cuBLAS (emulation).
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <string>

#include "backend/backend.h"

namespace mxlm::backend {

enum class MoeBackend { Native, Emulation };

// NCCL communicators of one process over several GPUs (cuda_tp.cpp): rank r of the group runs on device r.
class CudaTpGroup;

struct CudaOptions {
  int device = 0;  // ignored with a tensor-parallel group: rank r runs on the group's device r
  MoeBackend moe_backend = MoeBackend::Native;
  // Element of the KV / index-K caches: F32 (default, the CPU backend's) or BF16 (half the bytes decode attention
  // reads; values rounded to bf16 when written, attention math in f32).
  DType kv_cache_dtype = DType::F32;
  // Tensor parallelism: this backend is rank `tp_rank` of `tp` (null: TP = 1). all_reduce_sum / all_gather_cols
  // are NCCL collectives on the backend's stream, so every rank must be driven by its own host thread (NCCL blocks
  // a rank's host call until its peers arrive) and construct its backend on that thread (the constructor makes the
  // rank's device current there).
  std::shared_ptr<CudaTpGroup> tp;
  int tp_rank = 0;
};

// Parses "native" / "emulation" (the --moe-backend flag); anything else is an mxlm::Error.
MoeBackend parse_moe_backend(const std::string& name);

// An Error when no CUDA device is usable.
std::unique_ptr<Backend> make_cuda_backend(CudaOptions options = {});

// A weight of random values generated on the device, without host data (benchmarks of full-size layers,
// dummy loading): MXFP4 codes uniform over all 16 with scale bytes uniform in [118, 124] (2^-9 .. 2^-3),
// BF16/F32 values uniform in +-0.05. Usable with any CUDA backend (weights are not tied to one).
std::unique_ptr<Weight> make_random_cuda_weight(WeightFormat format, int64_t rows, int64_t cols, uint64_t seed);

// The stream every op of a CUDA backend is enqueued on (for events and CUDA-graph capture of decode steps; ops
// that read results on the host synchronise it, and cannot be captured). An Error for a non-CUDA backend.
cudaStream_t cuda_stream(Backend& backend);

// Whether a CUDA device is present (for tests that skip without one).
bool cuda_device_available();
// The number of CUDA devices (0 without a usable driver).
int cuda_device_count();

// A tensor-parallel group of `size` ranks on devices 0 .. size-1 of this process: one NCCL communicator per GPU
// (ncclCommInitAll), NVLink multicast (NVLS) off unless NCCL_NVLS_ENABLE says otherwise. An Error when fewer
// devices are present or NCCL fails.
std::shared_ptr<CudaTpGroup> make_cuda_tp_group(int size);

}  // namespace mxlm::backend
