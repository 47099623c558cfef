// The CUDA backend's factory and free functions; the class itself is in cuda_backend_impl.h.
#include "backend/cuda/cuda_backend.h"

#include "backend/cuda/cuda_backend_impl.h"

namespace mxlm::backend {

MoeBackend parse_moe_backend(const std::string& name) {
  if (name == "native") return MoeBackend::Native;
  if (name == "emulation") return MoeBackend::Emulation;
  fail("--moe-backend must be native or emulation, got '{}'", name);
}

std::unique_ptr<Weight> make_random_cuda_weight(WeightFormat format, int64_t rows, int64_t cols, uint64_t seed) {
  using namespace cuda;
  if (rows <= 0 || cols <= 0) fail("weight of invalid shape [{}, {}]", rows, cols);
  const size_t n = static_cast<size_t>(rows) * static_cast<size_t>(cols);
  auto w = std::make_unique<DeviceWeight>(format == WeightFormat::F16 ? WeightFormat::F32 : format, rows, cols);
  switch (format) {
    case WeightFormat::F32:
    case WeightFormat::F16:
      MXLM_CUDA_CHECK(cudaMalloc(&w->data_, n * 4));
      MXLM_CUDA_CHECK(launch_fill_random_f32(static_cast<float*>(w->data_), n, seed, 0.05f, nullptr));
      break;
    case WeightFormat::BF16:
      MXLM_CUDA_CHECK(cudaMalloc(&w->data_, n * 2));
      MXLM_CUDA_CHECK(launch_fill_random_bf16(static_cast<uint16_t*>(w->data_), n, seed, 0.05f, nullptr));
      break;
    case WeightFormat::MXFP4:
      if (cols % 32 != 0) fail("MXFP4 weight with {} columns (not a multiple of 32)", cols);
      MXLM_CUDA_CHECK(cudaMalloc(&w->data_, n / 2));
      MXLM_CUDA_CHECK(cudaMalloc(&w->scales_, n / 32));
      MXLM_CUDA_CHECK(launch_fill_random_bytes(static_cast<uint8_t*>(w->data_), n / 2, seed, 0, 255, nullptr));
      MXLM_CUDA_CHECK(launch_fill_random_bytes(w->scales_, n / 32, seed ^ 0x5555, 118, 124, nullptr));
      break;
  }
  MXLM_CUDA_CHECK(cudaDeviceSynchronize());
  return w;
}

cudaStream_t cuda_stream(Backend& backend) {
  auto* c = dynamic_cast<cuda::CudaBackend*>(&backend);
  if (!c) fail("cuda_stream: backend '{}' is not the CUDA backend", backend.name());
  return c->stream();
}

bool cuda_device_available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return n > 0;
}

std::unique_ptr<Backend> make_cuda_backend(CudaOptions options) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0)
    fail("--device cuda: no usable CUDA device ({})", e != cudaSuccess ? cudaGetErrorString(e) : "none found");
  if (options.tp) {
    if (options.tp_rank < 0 || options.tp_rank >= cuda::tp_group_size(*options.tp))
      fail("tensor-parallel rank {} of a group of {}", options.tp_rank, cuda::tp_group_size(*options.tp));
    options.device = cuda::tp_group_device(*options.tp, options.tp_rank);
  }
  if (options.device < 0 || options.device >= n) fail("CUDA device {} requested but {} present", options.device, n);
  return std::make_unique<cuda::CudaBackend>(options);
}

}  // namespace mxlm::backend
