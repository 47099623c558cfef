// Shared pieces of the GPU benchmarks (bench/bench_cuda*.cc, built and run by scripts/gpu_check): error checks,
// event / CUDA-graph / wall-clock timers (medians), a result table printed again at the end, and the card's two
// ceilings measured in the same process (device copy bandwidth, cuBLAS bf16 rate) that every result is a ratio of.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "backend/cuda/cuda_kernels.h"

namespace mxlm::cudabench {

namespace cu = mxlm::backend::cuda;

#define CK(x)                                                                                 \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                                           \
    }                                                                                         \
  } while (0)
#define CB(x)                                                                    \
  do {                                                                           \
    cublasStatus_t s_ = (x);                                                     \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                           \
      std::fprintf(stderr, "%s:%d %s: cublas %d\n", __FILE__, __LINE__, #x, s_); \
      std::exit(2);                                                              \
    }                                                                            \
  } while (0)

inline std::vector<std::string> g_table;
inline void row(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline void row(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  std::printf("%s\n", buf);
  std::fflush(stdout);
  g_table.push_back(buf);
}

inline void* dalloc(size_t bytes) {
  void* p = nullptr;
  CK(cudaMalloc(&p, bytes));
  return p;
}

// Median time (ms) of `reps` timed runs of `fn(i)`, each of `inner` calls, after `warm` warm-up calls.
inline cudaStream_t g_time_stream = nullptr;  // stream time_ms records its events on

template <typename Fn>
double time_ms(Fn fn, int reps, int inner = 1, int warm = 3) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  int i = 0;
  for (int w = 0; w < warm; ++w) fn(i++);
  CK(cudaDeviceSynchronize());
  std::vector<float> ts;
  for (int r = 0; r < reps; ++r) {
    CK(cudaEventRecord(a, g_time_stream));
    for (int j = 0; j < inner; ++j) fn(i++);
    CK(cudaEventRecord(b, g_time_stream));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms / static_cast<float>(inner));
  }
  CK(cudaGetLastError());
  std::sort(ts.begin(), ts.end());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ts[ts.size() / 2];
}

// Device time per call (ms, median of `reps` graph replays): `inner` calls captured into one CUDA graph on
// `stream`, so host launch overhead is out of the number (as in a graph-captured decode step).
template <typename Fn>
double graph_ms(cudaStream_t stream, Fn fn, int reps, int inner) {
  for (int w = 0; w < 2; ++w) fn(w);  // warm-up outside the capture (pools, handles, attributes)
  CK(cudaStreamSynchronize(stream));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
  for (int i = 0; i < inner; ++i) fn(i);
  CK(cudaStreamEndCapture(stream, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  CK(cudaGraphLaunch(exec, stream));
  CK(cudaStreamSynchronize(stream));
  std::vector<float> ts;
  for (int r = 0; r < reps; ++r) {
    CK(cudaEventRecord(a, stream));
    CK(cudaGraphLaunch(exec, stream));
    CK(cudaEventRecord(b, stream));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms / static_cast<float>(inner));
  }
  std::sort(ts.begin(), ts.end());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return ts[ts.size() / 2];
}

// Wall-clock median (ms) for calls that synchronise themselves (backend-level ops).
template <typename Fn>
double wall_ms(Fn fn, int reps, int warm = 2) {
  for (int w = 0; w < warm; ++w) fn();
  std::vector<double> ts;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const auto t1 = std::chrono::steady_clock::now();
    ts.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

inline void gemm_bf16(cublasHandle_t h, const void* w, const void* x, float* y, int n, int m, int k) {
  const float one = 1.0f, zero = 0.0f;
  CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, w, CUDA_R_16BF, k, x, CUDA_R_16BF, k, &zero, y,
                  CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

struct Ceilings {
  double copy_gbs = 0;  // (read + write) bytes per second of a large D2D copy
  double bf16_tflops = 0;
};

inline Ceilings measure_ceilings(cublasHandle_t h, bool quick) {
  Ceilings c;
  const size_t bytes = size_t{1} << 30;
  void* a = dalloc(bytes);
  void* b = dalloc(bytes);
  CK(cu::launch_fill_random_bytes(static_cast<uint8_t*>(a), bytes, 1, 0, 255, nullptr));
  const double ms = time_ms([&](int) { CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); }, quick ? 5 : 15);
  c.copy_gbs = 2.0 * static_cast<double>(bytes) / (ms * 1e-3) / 1e9;
  row("copy D2D 1 GiB: %.3f ms, %.0f GB/s (read + write)", ms, c.copy_gbs);
  CK(cudaFree(a));
  CK(cudaFree(b));
  const int n = 8192;
  auto* w = static_cast<uint16_t*>(dalloc(size_t{2} * n * n));
  auto* x = static_cast<uint16_t*>(dalloc(size_t{2} * n * n));
  auto* y = static_cast<float*>(dalloc(size_t{4} * n * n));
  CK(cu::launch_fill_random_bf16(w, size_t{1} * n * n, 2, 1.0f, nullptr));
  CK(cu::launch_fill_random_bf16(x, size_t{1} * n * n, 3, 1.0f, nullptr));
  const double gms = time_ms([&](int) { gemm_bf16(h, w, x, y, n, n, n); }, quick ? 5 : 10);
  c.bf16_tflops = 2.0 * n * n * static_cast<double>(n) / (gms * 1e-3) / 1e12;
  row("cuBLAS bf16 8192^3 (f32 out): %.3f ms, %.0f TFLOP/s", gms, c.bf16_tflops);
  CK(cudaFree(w));
  CK(cudaFree(x));
  CK(cudaFree(y));
  return c;
}

// Prints the collected table (the device tool returns the end of the output).
inline void print_summary(const char* device_name) {
  std::printf("\n===== summary (%s) =====\n", device_name);
  for (const auto& r : g_table) std::printf("%s\n", r.c_str());
}

}  // namespace mxlm::cudabench
