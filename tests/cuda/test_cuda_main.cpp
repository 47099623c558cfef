// Runs the registered GPU checks (gpu_check.h): all of them, or only those named after the fixtures folder.
//   test_cuda [tests/fixtures] [check ...]
#include <cuda_runtime.h>

#include <cstdio>
#include <exception>
#include <set>
#include <string>

#include "backend/cuda/cuda_backend.h"
#include "gpu_check.h"

int main(int argc, char** argv) {
  using namespace mxlm;
  using namespace mxlm::gpucheck;
  if (!backend::cuda_device_available()) {
    std::printf("SKIP: no CUDA device\n");
    return 0;
  }
  fs::path fixtures = argc > 1 ? fs::path(argv[1]) : fs::path("tests/fixtures");
  if (fs::exists(fixtures / "reference.json") || fixtures.filename() == "m3") fixtures = fixtures.parent_path();
  std::set<std::string> only;
  for (int i = 2; i < argc; ++i) only.insert(argv[i]);
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  auto cpu = backend::make_cpu_backend();
  backend::CudaOptions native, emulation;
  emulation.moe_backend = backend::MoeBackend::Emulation;
  auto gpu = backend::make_cuda_backend(native);
  auto gpu_emu = backend::make_cuda_backend(emulation);
  Env env{*cpu, *gpu, *gpu_emu, prop.multiProcessorCount, fixtures};
  for (const auto& check : registry()) {
    if (!only.empty() && !only.count(check.name)) continue;
    std::printf("---- %s\n", check.name);
    try {
      check.fn(env);
    } catch (const std::exception& e) {
      report(false, std::string(check.name) + ": exception: " + e.what(), 0, 0);
    }
  }
  std::printf("\n%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
