// Raw device buffers for the GPU checks that call the kernel launchers directly (cuda_kernels.h) instead of going
// through a Backend: allocations freed together, host vectors up and down.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

namespace mxlm::gpucheck {

struct DeviceAllocs {
  std::vector<void*> ptrs;
  DeviceAllocs() = default;
  DeviceAllocs(const DeviceAllocs&) = delete;
  DeviceAllocs& operator=(const DeviceAllocs&) = delete;
  ~DeviceAllocs() {
    for (void* p : ptrs) cudaFree(p);
  }
  template <typename T>
  T* get(size_t count) {
    void* p = nullptr;
    if (cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T)) != cudaSuccess) return nullptr;
    ptrs.push_back(p);
    return static_cast<T*>(p);
  }
  template <typename T>
  T* put(const std::vector<T>& v) {
    T* p = get<T>(v.size());
    cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
    return p;
  }
};

template <typename T>
std::vector<T> fetch(const T* p, size_t n) {
  std::vector<T> v(n);
  cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
  return v;
}

}  // namespace mxlm::gpucheck
