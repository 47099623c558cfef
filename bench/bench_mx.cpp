// MXFP4 kernel throughput, every ISA this CPU supports in one process so the ratios are visible.
// Bytes/s count the bf16/f32 side: input for quantize and QDQ, output for dequantize.
#include <benchmark/benchmark.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "mx/dispatch.h"
#include "mx/mxfp4.h"

namespace {

using namespace mxlm;
using namespace mxlm::mx;

constexpr size_t kRows = 2048, kK = 4096, kN = kRows * kK;  // a 2048 x 4096 weight: 16 MiB of bf16

const std::vector<uint16_t>& weights_bf16() {
  static const std::vector<uint16_t> w = [] {
    std::mt19937 rng(1);
    std::normal_distribution<float> dist(0.0f, 0.02f);
    std::vector<uint16_t> v(kN);
    for (auto& x : v) x = f32_to_bf16(dist(rng));
    return v;
  }();
  return w;
}

struct Quantized {
  std::vector<uint8_t> packed = std::vector<uint8_t>(kN / 2), scales = std::vector<uint8_t>(kN / 32);
};

const Quantized& quantized() {
  static const Quantized q = [] {
    Quantized r;
    ref::quantize_bf16(weights_bf16().data(), kRows, kK, r.packed.data(), r.scales.data(), ScaleRule::Even);
    return r;
  }();
  return q;
}

void quantize_bf16_bench(benchmark::State& state, Isa isa) {
  ScopedIsa scoped(isa);
  Quantized out;
  for (auto _ : state) {
    quantize_bf16(weights_bf16().data(), kRows, kK, out.packed.data(), out.scales.data());
    benchmark::DoNotOptimize(out.packed.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kN * 2));
}

void dequantize_bf16_bench(benchmark::State& state, Isa isa) {
  ScopedIsa scoped(isa);
  std::vector<uint16_t> out(kN);
  for (auto _ : state) {
    dequantize_bf16(quantized().packed.data(), quantized().scales.data(), kRows, kK, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kN * 2));
}

void dequantize_f32_bench(benchmark::State& state, Isa isa) {
  ScopedIsa scoped(isa);
  std::vector<float> out(kN);
  for (auto _ : state) {
    dequantize_f32(quantized().packed.data(), quantized().scales.data(), kRows, kK, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kN * 4));
}

// Activations: 64 tokens x 4096 (512 KiB of bf16, cache resident as in a decode/prefill step).
void qdq_bf16_bench(benchmark::State& state, Isa isa) {
  ScopedIsa scoped(isa);
  const size_t n = 64 * 4096;
  std::vector<uint16_t> x(weights_bf16().begin(), weights_bf16().begin() + n);
  for (auto _ : state) {
    qdq_bf16(x.data(), n);  // idempotent after the first pass; the kernels' cost does not depend on the data
    benchmark::DoNotOptimize(x.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n * 2));
}

int register_all() {
  for (Isa isa : supported_isas()) {
    const std::string name = isa_name(isa);
    benchmark::RegisterBenchmark(("quantize_bf16/" + name).c_str(), quantize_bf16_bench, isa)
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("dequantize_bf16/" + name).c_str(), dequantize_bf16_bench, isa)
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("dequantize_f32/" + name).c_str(), dequantize_f32_bench, isa)
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("qdq_bf16/" + name).c_str(), qdq_bf16_bench, isa)->Unit(benchmark::kMicrosecond);
  }
  return 0;
}

const int registered = register_all();

}  // namespace

BENCHMARK_MAIN();
