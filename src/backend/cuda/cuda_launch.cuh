// Programmatic Dependent Launch (PDL) for the CUDA kernel files: the device side (wait for the previous kernel's
// memory, let the next kernel's CTAs start) and one host launcher that sets the launch attribute. A kernel launched
// with PDL may start while its predecessor still runs: it must call pdl_wait() before it reads anything the
// predecessor writes (or writes anything it reads); work on constant inputs (weights) may go before the wait.
// Kernels that call pdl_wait() work unchanged when launched without the attribute (the wait returns at once).
#pragma once

#include <cuda_runtime.h>

namespace mxlm::backend::cuda {

__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;"); }

template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
                          Args... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

}  // namespace mxlm::backend::cuda
