// CPU GEMV/GEMM throughput against the machine's own memory bandwidth, measured in the same process.
//
//   build/bench/bench_gemv [--benchmark_filter=...]
//
// - MemoryRead / MemoryCopy: a 1 GiB streaming read (sum) and a 512 MiB memcpy, all threads.
// - BM_Gemv/<format>/<N>/<K>/<M> (format 0 = f32, 1 = bf16, 2 = MXFP4, 3 = OpenBLAS on f32, 4 = MXFP4 W4A4,
//   5 = MXFP4 with x quantize-dequantized to MXFP4 first, as the emulation feeds it; the label spells it
//   out): y = x . W^T at MiniMax-M3 expert shapes with enough distinct weight matrices
//   (> 4x L3) that every call streams W from DRAM. Counters: weight_GBps (weight bytes read per second) and
//   of_read_bw (that over the measured read bandwidth); cpu_share (process CPU time / (wall time x threads):
//   below 1 when other jobs share the cores, as on a busy dev VM). OpenBLAS sgemv/sgemm on f32 weights is
//   the baseline.
// - BM_Gemm/<format>/<N>/<K>/<M>: prefill-sized products (M = 128, 512) in GFLOP/s, OpenBLAS sgemm alongside.
#include <benchmark/benchmark.h>
#include <cblas.h>
#include <omp.h>

#include <bit>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <memory>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "backend/cpu/gemm.h"
#include "mx/mxfp4.h"

extern "C" void openblas_set_num_threads(int num_threads);

namespace {

constexpr size_t kGiB = size_t{1} << 30;
constexpr size_t kRotationBytes = size_t{160} << 20;  // > 4x the 32 MiB L3 of the dev VM

// Read bandwidth in bytes/s, measured by BM_MemoryRead (or on first use if that was filtered out).
double g_read_bandwidth = 0;

// Deterministic filler: never zeros, cheap enough for hundreds of MiB.
struct Fill {
  uint64_t state = 0x9e3779b97f4a7c15ull;
  uint64_t next() {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  }
  float uniform() { return static_cast<float>(next() >> 40) / static_cast<float>(1 << 24) * 2.0f - 1.0f; }
};

uint64_t sum_words(const uint64_t* data, size_t count) {
  uint64_t sum = 0;
#pragma omp parallel for reduction(+ : sum) schedule(static)
  for (size_t i = 0; i < count; ++i) sum += data[i];
  return sum;
}

std::vector<uint64_t> make_read_buffer() {
  std::vector<uint64_t> buffer(kGiB / 8);
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < buffer.size(); ++i) buffer[i] = i * 0x9e3779b97f4a7c15ull;
  return buffer;
}

double measure_read_bandwidth() {
  const auto buffer = make_read_buffer();
  double best = 0;
  for (int pass = 0; pass < 4; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(sum_words(buffer.data(), buffer.size()));
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (pass > 0 && kGiB / s > best) best = kGiB / s;
  }
  return best;
}

// Share of the machine's cores this process got while `body` ran: process CPU time over wall time x threads.
// On a VM shared with other jobs this is well below 1 and explains low numbers.
struct CpuShare {
  timespec cpu0{};
  std::chrono::steady_clock::time_point wall0 = std::chrono::steady_clock::now();
  CpuShare() { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu0); }
  double get() const {
    timespec cpu1{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu1);
    const double cpu =
        static_cast<double>(cpu1.tv_sec - cpu0.tv_sec) + 1e-9 * static_cast<double>(cpu1.tv_nsec - cpu0.tv_nsec);
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
    return cpu / (wall * omp_get_max_threads());
  }
};

double read_bandwidth() {
  if (g_read_bandwidth == 0) g_read_bandwidth = measure_read_bandwidth();
  return g_read_bandwidth;
}

void BM_MemoryRead(benchmark::State& state) {
  const auto buffer = make_read_buffer();
  benchmark::DoNotOptimize(sum_words(buffer.data(), buffer.size()));  // touch every page first
  double best = 0;
  const CpuShare share;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(sum_words(buffer.data(), buffer.size()));
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (kGiB / s > best) best = kGiB / s;
  }
  state.counters["cpu_share"] = share.get();
  g_read_bandwidth = best;
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kGiB));
  state.counters["best_GBps"] = best / 1e9;
  state.counters["threads"] = omp_get_max_threads();
}
BENCHMARK(BM_MemoryRead)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(1.0);

void BM_MemoryCopy(benchmark::State& state) {
  const size_t bytes = kGiB / 2;
  std::unique_ptr<char[]> src(new char[bytes]), dst(new char[bytes]);
  std::memset(src.get(), 1, bytes);
  std::memset(dst.get(), 2, bytes);
  const int threads = omp_get_max_threads();
  for (auto _ : state) {
#pragma omp parallel num_threads(threads)
    {
      const size_t part = bytes / static_cast<size_t>(omp_get_num_threads());
      const size_t begin = part * static_cast<size_t>(omp_get_thread_num());
      std::memcpy(dst.get() + begin, src.get() + begin, part);
    }
    benchmark::ClobberMemory();
  }
  // Read plus write traffic, as STREAM's copy counts it.
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * 2 * bytes));
}
BENCHMARK(BM_MemoryCopy)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(1.0);

enum Format { kF32Ours = 0, kBf16 = 1, kMxfp4 = 2, kF32OpenBlas = 3, kMxfp4W4a4 = 4, kMxfp4QdqX = 5 };

const char* format_name(int f) {
  switch (f) {
    case kF32Ours:
      return "f32";
    case kBf16:
      return "bf16";
    case kMxfp4:
      return "mxfp4";
    case kMxfp4W4a4:
      return "mxfp4_w4a4";
    case kMxfp4QdqX:
      return "mxfp4_qdq_x";
    default:
      return "openblas_f32";
  }
}

// `count` weight matrices of one format; each call uses the next one so the working set never fits in cache.
struct Weights {
  int format;
  size_t n, k, count;
  std::vector<float> f32;
  std::vector<uint16_t> bf16;
  std::vector<uint8_t> packed, scales;
  // W4A4 only: x as MXFP4 (random codes, scales near 1), made on first use for the caller's M.
  mutable std::vector<uint8_t> x_packed, x_scales;

  size_t bytes_per_matrix() const {
    switch (format) {
      case kBf16:
        return n * k * 2;
      case kMxfp4:
      case kMxfp4W4a4:
      case kMxfp4QdqX:
        return n * k / 2 + n * k / 32;
      default:
        return n * k * 4;
    }
  }

  Weights(int format_, size_t n_, size_t k_, bool rotate) : format(format_), n(n_), k(k_) {
    count = rotate ? (kRotationBytes + bytes_per_matrix() - 1) / bytes_per_matrix() : 1;
    Fill fill;
    const size_t elements = n * k * count;
    switch (format) {
      case kBf16:
        bf16.resize(elements);
        for (auto& v : bf16) v = static_cast<uint16_t>(std::bit_cast<uint32_t>(fill.uniform()) >> 16);
        break;
      case kMxfp4:
      case kMxfp4W4a4:
      case kMxfp4QdqX:
        packed.resize(elements / 2);
        scales.resize(elements / 32);
        for (auto& v : packed) v = static_cast<uint8_t>(fill.next());
        for (auto& v : scales) v = static_cast<uint8_t>(120 + fill.next() % 10);
        break;
      default:
        f32.resize(elements);
        for (auto& v : f32) v = fill.uniform();
        break;
    }
  }

  void multiply(size_t index, const float* x, size_t m, float* y) const {
    const size_t e = index % count;
    switch (format) {
      case kF32Ours:
        return mxlm::cpu::gemm_f32(x, m, k, f32.data() + e * n * k, n, y);
      case kBf16:
        return mxlm::cpu::gemm_bf16(x, m, k, bf16.data() + e * n * k, n, y);
      case kMxfp4:
      case kMxfp4QdqX:  // x is QDQ'd by the caller (activations() below)
        return mxlm::cpu::gemm_mxfp4(x, m, k, packed.data() + e * n * k / 2, scales.data() + e * n * k / 32, n, y);
      case kMxfp4W4a4:
        if (x_packed.size() != m * k / 2) {
          Fill fill;
          x_packed.resize(m * k / 2);
          x_scales.resize(m * k / 32);
          for (auto& v : x_packed) v = static_cast<uint8_t>(fill.next());
          for (auto& v : x_scales) v = static_cast<uint8_t>(122 + fill.next() % 10);
        }
        return mxlm::cpu::gemm_mxfp4_w4a4(x_packed.data(), x_scales.data(), m, k, packed.data() + e * n * k / 2,
                                          scales.data() + e * n * k / 32, n, y);
      default: {
        const float* w = f32.data() + e * n * k;
        if (m == 1) {
          return cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(n), static_cast<int>(k), 1.0f, w,
                             static_cast<int>(k), x, 1, 0.0f, y, 1);
        }
        return cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(n),
                           static_cast<int>(k), 1.0f, x, static_cast<int>(k), w, static_cast<int>(k), 0.0f, y,
                           static_cast<int>(n));
      }
    }
  }
};

std::vector<float> activations(size_t m, size_t k, int format) {
  Fill fill;
  std::vector<float> x(m * k);
  for (auto& v : x) v = fill.uniform();
  if (format == kMxfp4QdqX) mxlm::mx::qdq_f32(x.data(), x.size());
  return x;
}

// Args: format, N, K, M.
void BM_Gemv(benchmark::State& state) {
  const int format = static_cast<int>(state.range(0));
  const size_t n = static_cast<size_t>(state.range(1)), k = static_cast<size_t>(state.range(2));
  const size_t m = static_cast<size_t>(state.range(3));
  openblas_set_num_threads(omp_get_max_threads());
  const Weights w(format, n, k, true);
  const auto x = activations(m, k, format);
  std::vector<float> y(m * n);
  const double bandwidth = read_bandwidth();
  for (size_t e = 0; e < w.count; ++e) w.multiply(e, x.data(), m, y.data());  // warm-up, page faults
  size_t index = 0;
  const CpuShare share;
  for (auto _ : state) {
    w.multiply(index++, x.data(), m, y.data());
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["cpu_share"] = share.get();
  const double bytes = static_cast<double>(w.bytes_per_matrix()) * static_cast<double>(state.iterations());
  state.counters["weight_GBps"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsRate);
  state.counters["of_read_bw"] = benchmark::Counter(bytes / bandwidth, benchmark::Counter::kIsRate);
  state.counters["matrices"] = static_cast<double>(w.count);
  state.SetLabel(std::string(format_name(format)) + " " + std::to_string(n) + "x" + std::to_string(k) +
                 " m=" + std::to_string(m) + " (" + mxlm::cpu::gemm_isa() + ")");
}

void gemv_args(benchmark::internal::Benchmark* b) {
  for (auto [n, k] : {std::pair{3072, 6144}, std::pair{6144, 3072}})
    for (int m : {1, 4, 16})
      for (int format : {kMxfp4, kMxfp4QdqX, kMxfp4W4a4, kBf16, kF32Ours, kF32OpenBlas}) b->Args({format, n, k, m});
}
BENCHMARK(BM_Gemv)->Apply(gemv_args)->UseRealTime()->Unit(benchmark::kMicrosecond);

// Args: format, N, K, M. Compute-bound: one weight matrix, reused.
void BM_Gemm(benchmark::State& state) {
  const int format = static_cast<int>(state.range(0));
  const size_t n = static_cast<size_t>(state.range(1)), k = static_cast<size_t>(state.range(2));
  const size_t m = static_cast<size_t>(state.range(3));
  openblas_set_num_threads(omp_get_max_threads());
  const Weights w(format, n, k, false);
  const auto x = activations(m, k, format);
  std::vector<float> y(m * n);
  w.multiply(0, x.data(), m, y.data());
  const CpuShare share;
  for (auto _ : state) {
    w.multiply(0, x.data(), m, y.data());
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["cpu_share"] = share.get();
  const double flops = 2.0 * static_cast<double>(m * n * k) * static_cast<double>(state.iterations());
  state.counters["GFLOPs"] = benchmark::Counter(flops / 1e9, benchmark::Counter::kIsRate);
  state.SetLabel(std::string(format_name(format)) + " " + std::to_string(n) + "x" + std::to_string(k) +
                 " m=" + std::to_string(m) + " (" + mxlm::cpu::gemm_isa() + ")");
}

void gemm_args(benchmark::internal::Benchmark* b) {
  for (int m : {128, 512})
    for (int format : {kMxfp4, kMxfp4QdqX, kMxfp4W4a4, kBf16, kF32Ours, kF32OpenBlas}) b->Args({format, 3072, 6144, m});
}
BENCHMARK(BM_Gemm)->Apply(gemm_args)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
