// CPU GEMM kernels against three oracles: the scalar cpu::ref loops, a double-precision sum with weights
// decoded here from the format definitions (mxfp4_numerics.md §1), and OpenBLAS sgemm on those decoded
// weights. Every ISA this CPU supports is forced in turn.
//
// Tolerances. Any f32 summation of K products p_k obeys |sum_f32 - sum_exact| <= gamma * sum |p_k| with
// gamma = d * u / (1 - d * u), d the depth of the summation tree and u = 2^-24 (Higham, ch. 3). The
// reference adds in k order (d = K); the kernels keep 16 (AVX-512) or 8 (AVX2) lane sums over K / lanes
// terms and add the lanes in a tree (d <= K / 8 + 4); OpenBLAS blocks K likewise. We allow d = K + 8 for
// everything, which is still far below the error of one wrong or missing product in the shapes used here
// (K <= 2080: d * u <= 1.3e-4, while one product out of K is ~1 / K >= 4.8e-4 of sum |p|). Separate
// tests use data whose every partial sum is exact in f32, where all implementations must agree bit for bit.
#include "backend/cpu/gemm.h"

#include <cblas.h>
#include <gtest/gtest.h>
#include <omp.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/gemm_isa.h"
#include "core/error.h"

namespace mxlm::cpu {
namespace {

// --- Independent decoders (from the format definitions, in double) ---------------------------------------

double decode_bf16(uint16_t bits) { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }

double decode_f16(uint16_t bits) {
  const int sign = bits >> 15, exponent = (bits >> 10) & 0x1f, mantissa = bits & 0x3ff;
  double v;
  if (exponent == 0) {
    v = std::ldexp(mantissa, -24);
  } else if (exponent == 31) {
    v = mantissa ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else {
    v = std::ldexp(1024 + mantissa, exponent - 25);
  }
  return sign ? -v : v;
}

// E2M1: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; exponent 0 is subnormal (m * 0.5).
double decode_e2m1(int code) {
  const int e = (code >> 1) & 3, mant = code & 1;
  const double v = e == 0 ? 0.5 * mant : std::ldexp(1.0 + 0.5 * mant, e - 1);
  return (code & 8) ? -v : v;
}

double decode_e8m0(uint8_t byte) {
  return byte == 255 ? std::numeric_limits<double>::quiet_NaN() : std::ldexp(1.0, int{byte} - 127);
}

// --- Test problems ----------------------------------------------------------------------------------------

enum class Format { F32, Bf16, F16, Mxfp4 };

const char* format_name(Format f) {
  switch (f) {
    case Format::F32:
      return "f32";
    case Format::Bf16:
      return "bf16";
    case Format::F16:
      return "f16";
    case Format::Mxfp4:
      return "mxfp4";
  }
  return "?";
}

struct Problem {
  Format format;
  size_t m, k, n;
  std::vector<float> x;
  std::vector<float> w_f32;
  std::vector<uint16_t> w_16;
  std::vector<uint8_t> packed, scales;
  std::vector<double> w_decoded;  // [n, k], from the independent decoders
};

uint16_t to_bf16_bits(float v) { return static_cast<uint16_t>(std::bit_cast<uint32_t>(v) >> 16); }  // truncation

uint16_t to_f16_bits(double v) {
  // Only for values that are exact in f16 (used by the generators below).
  if (v == 0) return std::signbit(v) ? 0x8000 : 0;
  const uint16_t sign = v < 0 ? 0x8000 : 0;
  v = std::fabs(v);
  int e;
  const double frac = std::frexp(v, &e);  // v = frac * 2^e, frac in [0.5, 1)
  const int exponent = e + 14;            // biased exponent of 1.m form
  if (exponent <= 0) return sign | static_cast<uint16_t>(std::ldexp(v, 24));
  return sign | static_cast<uint16_t>(exponent << 10) | static_cast<uint16_t>(std::ldexp(frac * 2 - 1, 10));
}

// Random weights (never zero-filled); `exact` draws values whose products and sums are exact in f32.
Problem make_problem(Format format, size_t m, size_t k, size_t n, uint32_t seed, bool exact) {
  std::mt19937 rng(seed);
  Problem p{format, m, k, n, {}, {}, {}, {}, {}, {}};
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  std::uniform_int_distribution<int> small_int(-16, 16);
  p.x.resize(m * k);
  for (auto& v : p.x) v = exact ? static_cast<float>(small_int(rng)) * 0.25f : uni(rng);
  p.w_decoded.resize(n * k);
  switch (format) {
    case Format::F32:
      p.w_f32.resize(n * k);
      for (size_t i = 0; i < n * k; ++i) {
        p.w_f32[i] = exact ? static_cast<float>(small_int(rng)) * 0.5f : uni(rng);
        p.w_decoded[i] = p.w_f32[i];
      }
      break;
    case Format::Bf16:
      p.w_16.resize(n * k);
      for (size_t i = 0; i < n * k; ++i) {
        p.w_16[i] = to_bf16_bits(exact ? static_cast<float>(small_int(rng)) * 0.5f : uni(rng) * 4.0f);
        p.w_decoded[i] = decode_bf16(p.w_16[i]);
      }
      break;
    case Format::F16:
      p.w_16.resize(n * k);
      for (size_t i = 0; i < n * k; ++i) {
        // Random bit patterns over the finite range, subnormals included (exponent field 0..30).
        uint16_t bits;
        if (exact) {
          bits = to_f16_bits(small_int(rng) * 0.5);
        } else {
          do bits = static_cast<uint16_t>(rng());
          while (((bits >> 10) & 0x1f) > 17);  // |w| < 8
        }
        p.w_16[i] = bits;
        p.w_decoded[i] = decode_f16(bits);
      }
      break;
    case Format::Mxfp4: {
      p.packed.resize(n * k / 2);
      p.scales.resize(n * k / 32);
      for (auto& b : p.packed) b = static_cast<uint8_t>(rng());
      std::uniform_int_distribution<int> scale_byte(exact ? 125 : 100, exact ? 129 : 150);
      for (auto& s : p.scales) s = static_cast<uint8_t>(scale_byte(rng));
      for (size_t r = 0; r < n; ++r) {
        for (size_t c = 0; c < k; ++c) {
          const uint8_t byte = p.packed[r * k / 2 + c / 2];
          const int code = c % 2 == 0 ? byte & 0xf : byte >> 4;
          p.w_decoded[r * k + c] = decode_e2m1(code) * decode_e8m0(p.scales[r * k / 32 + c / 32]);
        }
      }
      break;
    }
  }
  return p;
}

void run_dispatched(const Problem& p, float* y) {
  switch (p.format) {
    case Format::F32:
      return gemm_f32(p.x.data(), p.m, p.k, p.w_f32.data(), p.n, y);
    case Format::Bf16:
      return gemm_bf16(p.x.data(), p.m, p.k, p.w_16.data(), p.n, y);
    case Format::F16:
      return gemm_f16(p.x.data(), p.m, p.k, p.w_16.data(), p.n, y);
    case Format::Mxfp4:
      return gemm_mxfp4(p.x.data(), p.m, p.k, p.packed.data(), p.scales.data(), p.n, y);
  }
}

void run_ref(const Problem& p, float* y) {
  switch (p.format) {
    case Format::F32:
      return ref::gemm_f32(p.x.data(), p.m, p.k, p.w_f32.data(), p.n, y);
    case Format::Bf16:
      return ref::gemm_bf16(p.x.data(), p.m, p.k, p.w_16.data(), p.n, y);
    case Format::F16:
      return ref::gemm_f16(p.x.data(), p.m, p.k, p.w_16.data(), p.n, y);
    case Format::Mxfp4:
      return ref::gemm_mxfp4(p.x.data(), p.m, p.k, p.packed.data(), p.scales.data(), p.n, y);
  }
}

// Output pre-filled with NaN so that an element the kernel forgets to write fails every comparison.
std::vector<float> poisoned(size_t size) { return std::vector<float>(size, std::numeric_limits<float>::quiet_NaN()); }

struct Exact {
  std::vector<double> sum, abs_sum;
};

Exact exact_product(const Problem& p) {
  Exact e{std::vector<double>(p.m * p.n), std::vector<double>(p.m * p.n)};
  for (size_t i = 0; i < p.m; ++i) {
    for (size_t j = 0; j < p.n; ++j) {
      double s = 0, a = 0;
      for (size_t c = 0; c < p.k; ++c) {
        const double prod = double{p.x[i * p.k + c]} * p.w_decoded[j * p.k + c];
        s += prod;
        a += std::fabs(prod);
      }
      e.sum[i * p.n + j] = s;
      e.abs_sum[i * p.n + j] = a;
    }
  }
  return e;
}

// Summation error bound for depth d = K + 8 (see the top of the file), plus a few subnormal ulps.
double bound(const Problem& p, double abs_sum) {
  const double du = static_cast<double>(p.k + 8) * std::ldexp(1.0, -24);
  return du / (1 - du) * abs_sum + static_cast<double>(p.k) * std::ldexp(1.0, -149);
}

void expect_near_exact(const Problem& p, const Exact& e, const std::vector<float>& y, const std::string& what) {
  size_t bad = 0;
  for (size_t t = 0; t < p.m * p.n && bad < 5; ++t) {
    const double err = std::fabs(double{y[t]} - e.sum[t]);
    if (!(err <= bound(p, e.abs_sum[t]))) {
      ADD_FAILURE() << what << " " << format_name(p.format) << " m=" << p.m << " k=" << p.k << " n=" << p.n << " at ("
                    << t / p.n << ", " << t % p.n << "): got " << y[t] << ", exact " << e.sum[t] << ", error " << err
                    << " > bound " << bound(p, e.abs_sum[t]);
      ++bad;
    }
  }
}

std::vector<GemmIsa> supported_isas() {
  std::vector<GemmIsa> isas;
  for (GemmIsa isa : {GemmIsa::Scalar, GemmIsa::Avx2, GemmIsa::Avx512})
    if (gemm_isa_supported(isa)) isas.push_back(isa);
  return isas;
}

// Restores the automatic choice even when an assertion returns early.
struct ForcedIsa {
  explicit ForcedIsa(GemmIsa isa) { gemm_force_isa(isa); }
  ~ForcedIsa() { gemm_reset_isa(); }
  ForcedIsa(const ForcedIsa&) = delete;
  ForcedIsa& operator=(const ForcedIsa&) = delete;
};

std::vector<size_t> k_values(Format f) {
  if (f == Format::Mxfp4) return {32, 64, 96, 1056, 2080};
  return {1, 5, 17, 31, 32, 33, 100, 1056, 2061};
}

const std::vector<size_t> kMValues = {1, 2, 3, 4, 5, 7, 16, 21};
const std::vector<size_t> kNValues = {1, 7, 8, 9, 33};

class GemmFormatTest : public ::testing::TestWithParam<Format> {};

TEST_P(GemmFormatTest, EveryIsaMatchesReferenceAndDoubleSums) {
  const Format format = GetParam();
  uint32_t seed = 1;
  for (size_t k : k_values(format)) {
    for (size_t m : kMValues) {
      for (size_t n : kNValues) {
        if (k > 1000 && m * n > 64) continue;  // keeps the double reference fast; big shapes come below
        const Problem p = make_problem(format, m, k, n, seed++, false);
        const Exact e = exact_product(p);
        std::vector<float> y_ref = poisoned(m * n);
        run_ref(p, y_ref.data());
        expect_near_exact(p, e, y_ref, "ref");
        for (GemmIsa isa : supported_isas()) {
          ForcedIsa forced(isa);
          std::vector<float> y = poisoned(m * n);
          run_dispatched(p, y.data());
          expect_near_exact(p, e, y, gemm_isa_name(isa));
          if (isa == GemmIsa::Scalar) {
            // Same summation order as the reference: bit-identical.
            for (size_t t = 0; t < m * n; ++t)
              ASSERT_EQ(std::bit_cast<uint32_t>(y[t]), std::bit_cast<uint32_t>(y_ref[t])) << t;
          }
        }
      }
    }
  }
}

TEST_P(GemmFormatTest, ExactDataGivesIdenticalResultsEverywhere) {
  // x in multiples of 1/4 up to 4, weights in multiples of 1/8 up to 24: every partial sum of these shapes
  // needs at most 23 significant bits, so any summation order gives the exact result.
  const Format format = GetParam();
  uint32_t seed = 100;
  for (size_t k : k_values(format)) {
    for (size_t m : {size_t{1}, size_t{3}, size_t{6}}) {
      const size_t n = 11;
      const Problem p = make_problem(format, m, k, n, seed++, true);
      const Exact e = exact_product(p);
      std::vector<float> y = poisoned(m * n);
      run_ref(p, y.data());
      for (size_t t = 0; t < m * n; ++t) ASSERT_EQ(double{y[t]}, e.sum[t]) << "ref k=" << k << " m=" << m;
      for (GemmIsa isa : supported_isas()) {
        ForcedIsa forced(isa);
        y = poisoned(m * n);
        run_dispatched(p, y.data());
        for (size_t t = 0; t < m * n; ++t)
          ASSERT_EQ(double{y[t]}, e.sum[t]) << gemm_isa_name(isa) << " k=" << k << " m=" << m << " t=" << t;
      }
    }
  }
}

TEST_P(GemmFormatTest, MatchesOpenBlasOnDecodedWeights) {
  // Prefill- and decode-like shapes with several K panels and ragged edges; OpenBLAS sgemm on the weights
  // decoded by this test is the independent oracle (its own blocking, its own summation order).
  const Format format = GetParam();
  const size_t k = format == Format::Mxfp4 ? 1568 : 1571;
  for (size_t m : {size_t{1}, size_t{4}, size_t{37}}) {
    const size_t n = 75;
    const Problem p = make_problem(format, m, k, n, 7 + static_cast<uint32_t>(m), false);
    std::vector<float> w(p.w_decoded.begin(), p.w_decoded.end());
    std::vector<float> y_blas(m * n);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
                1.0f, p.x.data(), static_cast<int>(k), w.data(), static_cast<int>(k), 0.0f, y_blas.data(),
                static_cast<int>(n));
    const Exact e = exact_product(p);
    expect_near_exact(p, e, y_blas, "openblas");
    for (GemmIsa isa : supported_isas()) {
      ForcedIsa forced(isa);
      std::vector<float> y = poisoned(m * n);
      run_dispatched(p, y.data());
      for (size_t t = 0; t < m * n; ++t) {
        // Both within the bound of the exact sum, so within twice it of each other.
        ASSERT_LE(std::fabs(double{y[t]} - y_blas[t]), 2 * bound(p, e.abs_sum[t]))
            << gemm_isa_name(isa) << " m=" << m << " t=" << t << " got " << y[t] << " openblas " << y_blas[t];
      }
    }
  }
}

TEST_P(GemmFormatTest, RowsAreIndependentOfBatchAndThreads) {
  // Each output is summed in the same order whatever the other rows of x are and however many threads run,
  // so a batched forward pass gives the same bits as one sequence at a time.
  const Format format = GetParam();
  const size_t m = 13, k = format == Format::Mxfp4 ? 544 : 547, n = 70;
  const Problem p = make_problem(format, m, k, n, 99, false);
  for (GemmIsa isa : supported_isas()) {
    ForcedIsa forced(isa);
    std::vector<float> batched = poisoned(m * n);
    run_dispatched(p, batched.data());
    for (size_t i = 0; i < m; ++i) {
      Problem single = p;
      single.m = 1;
      single.x.assign(p.x.begin() + static_cast<long>(i * k), p.x.begin() + static_cast<long>((i + 1) * k));
      std::vector<float> y = poisoned(n);
      run_dispatched(single, y.data());
      for (size_t j = 0; j < n; ++j)
        ASSERT_EQ(std::bit_cast<uint32_t>(y[j]), std::bit_cast<uint32_t>(batched[i * n + j]))
            << gemm_isa_name(isa) << " row " << i << " col " << j;
    }
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    std::vector<float> one_thread = poisoned(m * n);
    run_dispatched(p, one_thread.data());
    omp_set_num_threads(threads);
    for (size_t t = 0; t < m * n; ++t)
      ASSERT_EQ(std::bit_cast<uint32_t>(one_thread[t]), std::bit_cast<uint32_t>(batched[t])) << gemm_isa_name(isa);
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, GemmFormatTest,
                         ::testing::Values(Format::F32, Format::Bf16, Format::F16, Format::Mxfp4),
                         [](const auto& info) { return std::string(format_name(info.param)); });

TEST(GemmMxfp4, SmallestScaleByteIsExactSubnormal) {
  // Scale byte 0 is 2^-127 (a float32 subnormal), byte 1 is 2^-126: products stay exact subnormals or small
  // normals; with x in multiples of 1/4 every sum here is exact, so all paths must give the exact value.
  const size_t m = 3, k = 96, n = 10;
  Problem p = make_problem(Format::Mxfp4, m, k, n, 5, true);
  for (size_t s = 0; s < p.scales.size(); ++s) p.scales[s] = s % 2 == 0 ? 0 : 1;
  for (size_t r = 0; r < n; ++r)
    for (size_t c = 0; c < k; ++c) {
      const uint8_t byte = p.packed[r * k / 2 + c / 2];
      p.w_decoded[r * k + c] =
          decode_e2m1(c % 2 == 0 ? byte & 0xf : byte >> 4) * decode_e8m0(p.scales[r * k / 32 + c / 32]);
    }
  const Exact e = exact_product(p);
  bool any_nonzero = false;
  for (double v : e.sum) any_nonzero |= v != 0;
  ASSERT_TRUE(any_nonzero);
  std::vector<float> y = poisoned(m * n);
  run_ref(p, y.data());
  for (size_t t = 0; t < m * n; ++t) ASSERT_EQ(double{y[t]}, e.sum[t]) << "ref " << t;
  for (GemmIsa isa : supported_isas()) {
    ForcedIsa forced(isa);
    y = poisoned(m * n);
    run_dispatched(p, y.data());
    for (size_t t = 0; t < m * n; ++t) ASSERT_EQ(double{y[t]}, e.sum[t]) << gemm_isa_name(isa) << " " << t;
  }
}

TEST(GemmMxfp4, NanScaleByteGivesNanOnlyInItsRow) {
  const size_t m = 2, k = 64, n = 5;
  Problem p = make_problem(Format::Mxfp4, m, k, n, 6, false);
  p.scales[2 * (k / 32) + 1] = 255;  // row 2, second block
  for (GemmIsa isa : supported_isas()) {
    ForcedIsa forced(isa);
    std::vector<float> y = poisoned(m * n);
    run_dispatched(p, y.data());
    for (size_t i = 0; i < m; ++i)
      for (size_t j = 0; j < n; ++j) EXPECT_EQ(std::isnan(y[i * n + j]), j == 2) << gemm_isa_name(isa);
  }
}

TEST(GemmMxfp4, NanScaleByteGivesNanOnlyInItsRowForBf16ExactActivationsToo) {
  // Bf16-exact x takes the AVX-512 bf16 path; scale bytes 0 and 255 switch its tile to table-looked-up scales.
  const size_t m = 3, k = 160, n = 9;
  Problem p = make_problem(Format::Mxfp4, m, k, n, 16, false);
  for (auto& v : p.x) v = std::bit_cast<float>(std::bit_cast<uint32_t>(v) & 0xffff0000u);
  p.scales[2 * (k / 32) + 4] = 255;  // row 2, last block (the K tail of a 128-wide group)
  p.scales[5 * (k / 32) + 1] = 0;    // row 5: 2^-127, finite
  for (GemmIsa isa : supported_isas()) {
    ForcedIsa forced(isa);
    std::vector<float> y = poisoned(m * n);
    run_dispatched(p, y.data());
    for (size_t i = 0; i < m; ++i)
      for (size_t j = 0; j < n; ++j) EXPECT_EQ(std::isnan(y[i * n + j]), j == 2) << gemm_isa_name(isa);
  }
}

// --- MXFP4: the per-row activation paths -------------------------------------------------------------------
// The AVX-512 MXFP4 kernel picks a path per row of x from that row's values alone: bf16-exact rows with every
// nonzero |x| in [2^-100, 2^100) (what the emulation's QDQ produces) use vdpbf16ps; other rows with |x| < 2^100
// use f32 FMAs with the block scale applied to each 128-wide group sum; rows with larger, infinite or NaN values
// use f32 FMAs on scaled weights. These tests give each path its own inputs, alone and mixed in one batch.

enum class Activations { Uniform, Qdq, Bf16BelowRange, Bf16Tiny, Huge, Subnormal, Count };

std::vector<float> activation_row(Activations kind, size_t k, std::mt19937& rng) {
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  std::uniform_int_distribution<int> code(0, 15), exponent(-8, 8);
  std::vector<float> x(k);
  switch (kind) {
    case Activations::Uniform:
    case Activations::Count:
      for (auto& v : x) v = uni(rng);
      break;
    case Activations::Qdq:  // E2M1 values times a power of two per block of 32, as mx::qdq_f32 leaves them
      for (size_t b = 0; b < k; b += 32) {
        const int e = exponent(rng);
        for (size_t c = b; c < b + 32 && c < k; ++c) x[c] = static_cast<float>(std::ldexp(decode_e2m1(code(rng)), e));
      }
      break;
    case Activations::Bf16BelowRange:  // bf16-exact, but one value below 2^-100: not the bf16 path
      for (auto& v : x) v = std::bit_cast<float>(std::bit_cast<uint32_t>(uni(rng)) & 0xffff0000u);
      x[k / 2] = std::ldexp(1.5f, -110);
      break;
    case Activations::Bf16Tiny:  // bf16-exact values around 2^-126, subnormals among them: vdpbf16ps would flush them
      for (auto& v : x) v = std::bit_cast<float>(std::bit_cast<uint32_t>(std::ldexp(uni(rng), -122)) & 0xffff0000u);
      break;
    case Activations::Huge:  // up to 2^125: a group sum of 8 products x * e could overflow where x * (e * scale) does
                             // not
      for (auto& v : x) v = std::ldexp(uni(rng), 125);
      break;
    case Activations::Subnormal:  // f32 subnormals (and their products with the weights) among normal values
      for (size_t c = 0; c < k; ++c) x[c] = c % 3 == 0 ? uni(rng) : std::ldexp(uni(rng), -130);
      break;
  }
  return x;
}

// Weights with scale bytes in [lo, hi], decoded again after the change.
void set_scales(Problem& p, std::mt19937& rng, int lo, int hi) {
  std::uniform_int_distribution<int> byte(lo, hi);
  for (auto& s : p.scales) s = static_cast<uint8_t>(byte(rng));
  for (size_t r = 0; r < p.n; ++r)
    for (size_t c = 0; c < p.k; ++c) {
      const uint8_t b = p.packed[r * p.k / 2 + c / 2];
      p.w_decoded[r * p.k + c] =
          decode_e2m1(c % 2 == 0 ? b & 0xf : b >> 4) * decode_e8m0(p.scales[r * p.k / 32 + c / 32]);
    }
}

TEST(GemmMxfp4Activations, EveryPathMatchesReferenceAndDoubleSums) {
  uint32_t seed = 700;
  for (int kind = 0; kind < static_cast<int>(Activations::Count); ++kind) {
    for (size_t k : {size_t{32}, size_t{96}, size_t{160}, size_t{1056}, size_t{2080}}) {
      for (size_t m : {size_t{1}, size_t{2}, size_t{3}, size_t{5}}) {
        const size_t n = 9;
        std::mt19937 rng(seed++);
        Problem p = make_problem(Format::Mxfp4, m, k, n, seed, false);
        // Huge x with small weight scales keeps every product and sum finite (|y| < 2^118).
        if (static_cast<Activations>(kind) == Activations::Huge) set_scales(p, rng, 90, 105);
        for (size_t i = 0; i < m; ++i) {
          const auto row = activation_row(static_cast<Activations>(kind), k, rng);
          std::copy(row.begin(), row.end(), p.x.begin() + static_cast<long>(i * k));
        }
        const Exact e = exact_product(p);
        std::vector<float> y_ref = poisoned(m * n);
        run_ref(p, y_ref.data());
        expect_near_exact(p, e, y_ref, "ref kind " + std::to_string(kind));
        for (GemmIsa isa : supported_isas()) {
          ForcedIsa forced(isa);
          std::vector<float> y = poisoned(m * n);
          run_dispatched(p, y.data());
          expect_near_exact(p, e, y, std::string(gemm_isa_name(isa)) + " kind " + std::to_string(kind));
        }
      }
    }
  }
}

TEST(GemmMxfp4Activations, RowsOfDifferentPathsInOneBatchGiveTheRowsAlone) {
  const size_t m = 11, k = 1184, n = 37;  // K = 9 groups of 128 and a 32-wide tail
  Problem p = make_problem(Format::Mxfp4, m, k, n, 31, false);
  std::mt19937 rng(32);
  set_scales(p, rng, 90, 105);
  for (size_t i = 0; i < m; ++i) {
    const auto row = activation_row(static_cast<Activations>(i % static_cast<size_t>(Activations::Count)), k, rng);
    std::copy(row.begin(), row.end(), p.x.begin() + static_cast<long>(i * k));
  }
  for (GemmIsa isa : supported_isas()) {
    ForcedIsa forced(isa);
    std::vector<float> batched = poisoned(m * n);
    run_dispatched(p, batched.data());
    for (size_t i = 0; i < m; ++i) {
      Problem single = p;
      single.m = 1;
      single.x.assign(p.x.begin() + static_cast<long>(i * k), p.x.begin() + static_cast<long>((i + 1) * k));
      std::vector<float> y = poisoned(n);
      run_dispatched(single, y.data());
      for (size_t j = 0; j < n; ++j)
        ASSERT_EQ(std::bit_cast<uint32_t>(y[j]), std::bit_cast<uint32_t>(batched[i * n + j]))
            << gemm_isa_name(isa) << " row " << i << " col " << j;
    }
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    std::vector<float> one_thread = poisoned(m * n);
    run_dispatched(p, one_thread.data());
    omp_set_num_threads(threads);
    for (size_t t = 0; t < m * n; ++t)
      ASSERT_EQ(std::bit_cast<uint32_t>(one_thread[t]), std::bit_cast<uint32_t>(batched[t])) << gemm_isa_name(isa);
  }
}

TEST(GemmMxfp4Activations, LargeCallsGiveTheSameBitsWithAnyThreadCount) {
  // Big enough to be split across threads (runs of 8-row tiles claimed from a shared counter, shrinking towards
  // the end; N not a multiple of 8): every thread count, oversubscribed ones included, must give the bits of one
  // thread, and those must be within the summation bound of the double sums.
  const size_t m = 3, k = 288, n = 1029;  // K = 2 groups of 128 and a 32-wide tail
  Problem p = make_problem(Format::Mxfp4, m, k, n, 41, false);
  std::mt19937 rng(42);
  for (size_t i = 0; i < m; ++i) {
    const auto kind = i == 0 ? Activations::Uniform : i == 1 ? Activations::Qdq : Activations::Huge;
    const auto row = activation_row(kind, k, rng);
    std::copy(row.begin(), row.end(), p.x.begin() + static_cast<long>(i * k));
  }
  set_scales(p, rng, 90, 105);
  const Exact e = exact_product(p);
  const int threads = omp_get_max_threads();
  for (GemmIsa isa : supported_isas()) {
    ForcedIsa forced(isa);
    omp_set_num_threads(1);
    std::vector<float> one_thread = poisoned(m * n);
    run_dispatched(p, one_thread.data());
    expect_near_exact(p, e, one_thread, gemm_isa_name(isa));
    for (int t : {2, 3, 5}) {
      omp_set_num_threads(t);
      for (size_t rows : {size_t{1}, m}) {  // M = 1 (the GEMV) and the whole batch
        Problem q = p;
        q.m = rows;
        q.x.resize(rows * k);
        std::vector<float> y = poisoned(rows * n);
        run_dispatched(q, y.data());
        for (size_t u = 0; u < rows * n; ++u)
          ASSERT_EQ(std::bit_cast<uint32_t>(one_thread[u]), std::bit_cast<uint32_t>(y[u]))
              << gemm_isa_name(isa) << " threads " << t << " m " << rows << " at " << u;
      }
    }
    omp_set_num_threads(threads);
  }
}

TEST(GemmMxfp4Activations, InfiniteAndNanActivationsGiveTheReferenceClass) {
  // One +Inf (row 0) or NaN (row 1) among finite values: outputs are NaN where the reference has NaN (Inf times a
  // zero weight, or Infs of both signs) and the same infinity otherwise.
  const size_t m = 2, k = 96, n = 33;
  Problem p = make_problem(Format::Mxfp4, m, k, n, 41, false);
  p.x[5] = std::numeric_limits<float>::infinity();
  p.x[k + 70] = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> y_ref = poisoned(m * n);
  run_ref(p, y_ref.data());
  size_t infinite = 0;
  for (size_t j = 0; j < n; ++j) infinite += std::isinf(y_ref[j]);
  ASSERT_GT(infinite, 0u);  // the draw has nonzero and zero weights at column 5
  ASSERT_LT(infinite, n);
  for (GemmIsa isa : supported_isas()) {
    ForcedIsa forced(isa);
    std::vector<float> y = poisoned(m * n);
    run_dispatched(p, y.data());
    for (size_t t = 0; t < m * n; ++t) {
      EXPECT_EQ(std::isnan(y[t]), std::isnan(y_ref[t])) << gemm_isa_name(isa) << " " << t;
      if (std::isinf(y_ref[t])) {
        EXPECT_EQ(y[t], y_ref[t]) << gemm_isa_name(isa) << " " << t;
      }
    }
  }
}

// --- W4A4 ------------------------------------------------------------------------------------------------------

struct W4a4Problem {
  size_t m, k, n;
  std::vector<uint8_t> x_packed, x_scales, w_packed, w_scales;
  std::vector<double> x_decoded, w_decoded;  // [m, k], [n, k]
};

void fill_mxfp4(std::mt19937& rng, size_t rows, size_t k, int scale_lo, int scale_hi, std::vector<uint8_t>& packed,
                std::vector<uint8_t>& scales, std::vector<double>& decoded) {
  packed.resize(rows * k / 2);
  scales.resize(rows * k / 32);
  decoded.resize(rows * k);
  for (auto& b : packed) b = static_cast<uint8_t>(rng());
  std::uniform_int_distribution<int> scale_byte(scale_lo, scale_hi);
  for (auto& v : scales) v = static_cast<uint8_t>(scale_byte(rng));
  for (size_t r = 0; r < rows; ++r)
    for (size_t c = 0; c < k; ++c) {
      const uint8_t byte = packed[r * k / 2 + c / 2];
      decoded[r * k + c] = decode_e2m1(c % 2 == 0 ? byte & 0xf : byte >> 4) * decode_e8m0(scales[r * k / 32 + c / 32]);
    }
}

W4a4Problem make_w4a4(size_t m, size_t k, size_t n, uint32_t seed, int scale_lo, int scale_hi) {
  std::mt19937 rng(seed);
  W4a4Problem p{m, k, n, {}, {}, {}, {}, {}, {}};
  fill_mxfp4(rng, m, k, scale_lo, scale_hi, p.x_packed, p.x_scales, p.x_decoded);
  fill_mxfp4(rng, n, k, scale_lo - 10, scale_hi + 10, p.w_packed, p.w_scales, p.w_decoded);
  return p;
}

TEST(GemmW4a4, MatchesReferenceDoubleSumsAndTheEmulationPath) {
  uint32_t seed = 500;
  for (size_t k : {size_t{32}, size_t{64}, size_t{96}, size_t{160}, size_t{1056}, size_t{2080}}) {
    for (size_t m : {size_t{1}, size_t{2}, size_t{3}, size_t{5}}) {
      for (size_t n : {size_t{1}, size_t{4}, size_t{9}, size_t{19}}) {
        const W4a4Problem p = make_w4a4(m, k, n, seed++, 115, 135);
        // The emulation path: x dequantized to f32 (exact), then the f32 GEMM against the MXFP4 weights.
        Problem emul{Format::Mxfp4, m, k, n, {}, {}, {}, p.w_packed, p.w_scales, p.w_decoded};
        emul.x.assign(p.x_decoded.begin(), p.x_decoded.end());
        const Exact e = exact_product(emul);
        std::vector<float> y_ref = poisoned(m * n);
        ref::gemm_mxfp4_w4a4(p.x_packed.data(), p.x_scales.data(), m, k, p.w_packed.data(), p.w_scales.data(), n,
                             y_ref.data());
        expect_near_exact(emul, e, y_ref, "ref w4a4");
        for (GemmIsa isa : supported_isas()) {
          ForcedIsa forced(isa);
          std::vector<float> y = poisoned(m * n);
          gemm_mxfp4_w4a4(p.x_packed.data(), p.x_scales.data(), m, k, p.w_packed.data(), p.w_scales.data(), n,
                          y.data());
          expect_near_exact(emul, e, y, std::string("w4a4 ") + gemm_isa_name(isa));
          std::vector<float> y_emul = poisoned(m * n);
          run_dispatched(emul, y_emul.data());
          for (size_t t = 0; t < m * n; ++t)
            ASSERT_LE(std::fabs(double{y[t]} - y_emul[t]), 2 * bound(emul, e.abs_sum[t])) << gemm_isa_name(isa);
          if (isa != GemmIsa::Avx512) {
            for (size_t t = 0; t < m * n; ++t)  // the scalar version, same order as the reference
              ASSERT_EQ(std::bit_cast<uint32_t>(y[t]), std::bit_cast<uint32_t>(y_ref[t])) << gemm_isa_name(isa);
          }
        }
      }
    }
  }
}

TEST(GemmW4a4, ExactDataGivesExactResults) {
  // Scales 2^-1..2^1: values are multiples of 1/4 up to 12, products multiples of 1/16 up to 144; K <= 2080
  // keeps every partial sum within 23 significant bits, so all orders give the exact sum.
  uint32_t seed = 900;
  for (size_t k : {size_t{32}, size_t{96}, size_t{2080}}) {
    const size_t m = 3, n = 10;
    W4a4Problem p = make_w4a4(m, k, n, seed++, 126, 128);
    for (auto& v : p.w_scales) v = static_cast<uint8_t>(126 + v % 3);
    for (size_t r = 0; r < n; ++r)
      for (size_t c = 0; c < k; ++c) {
        const uint8_t byte = p.w_packed[r * k / 2 + c / 2];
        p.w_decoded[r * k + c] =
            decode_e2m1(c % 2 == 0 ? byte & 0xf : byte >> 4) * decode_e8m0(p.w_scales[r * k / 32 + c / 32]);
      }
    Problem emul{Format::Mxfp4, m, k, n, {}, {}, {}, p.w_packed, p.w_scales, p.w_decoded};
    emul.x.assign(p.x_decoded.begin(), p.x_decoded.end());
    const Exact e = exact_product(emul);
    for (GemmIsa isa : supported_isas()) {
      ForcedIsa forced(isa);
      std::vector<float> y = poisoned(m * n);
      gemm_mxfp4_w4a4(p.x_packed.data(), p.x_scales.data(), m, k, p.w_packed.data(), p.w_scales.data(), n, y.data());
      for (size_t t = 0; t < m * n; ++t) ASSERT_EQ(double{y[t]}, e.sum[t]) << gemm_isa_name(isa) << " k=" << k;
    }
  }
}

TEST(GemmErrors, RejectsBadArguments) {
  std::vector<float> x(64, 1.0f), y(4);
  std::vector<uint8_t> packed(64), scales(4);
  EXPECT_THROW(gemm_mxfp4(x.data(), 1, 48, packed.data(), scales.data(), 1, y.data()), Error);
  EXPECT_THROW(gemm_f32(x.data(), 1, 64, nullptr, 1, y.data()), Error);
  EXPECT_THROW(gemm_f32(x.data(), 1, 64, x.data(), 1, nullptr), Error);
  EXPECT_THROW(gemm_mxfp4(x.data(), 1, 32, packed.data(), nullptr, 1, y.data()), Error);
  EXPECT_THROW(gemm_mxfp4_w4a4(packed.data(), scales.data(), 1, 48, packed.data(), scales.data(), 1, y.data()), Error);
  EXPECT_THROW(gemm_mxfp4_w4a4(packed.data(), nullptr, 1, 32, packed.data(), scales.data(), 1, y.data()), Error);
}

TEST(GemmErrors, EmptyShapes) {
  // K = 0: an empty sum is zero; M or N = 0 writes nothing.
  std::vector<float> x(4, 1.0f), w(4, 1.0f), y = poisoned(4);
  for (GemmIsa isa : supported_isas()) {
    ForcedIsa forced(isa);
    y = poisoned(4);
    gemm_f32(x.data(), 2, 0, w.data(), 2, y.data());
    for (float v : y) EXPECT_EQ(v, 0.0f) << gemm_isa_name(isa);
    y = poisoned(4);
    gemm_f32(x.data(), 0, 2, w.data(), 2, y.data());
    for (float v : y) EXPECT_TRUE(std::isnan(v));
  }
}

TEST(GemmDispatch, BestIsReportedAndSelectable) {
  const std::string best = gemm_isa();
  EXPECT_EQ(best, gemm_isa_name(gemm_best_isa()));
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    EXPECT_EQ(best, "avx512");
  }
  {
    ForcedIsa forced(GemmIsa::Scalar);
    EXPECT_STREQ(gemm_isa(), "scalar");
  }
  EXPECT_EQ(std::string(gemm_isa()), best);
}

}  // namespace
}  // namespace mxlm::cpu
