// The arithmetic of token sampling (sampling.h) written once for the host and the device (cuda_sample.cu), so that
// the CPU reference and the CUDA kernel pick the same token from the same logits: only IEEE-exact operations
// (division, multiplication, fma, conversions by truncation) and integer sums, which no summation order changes.
//
// A token's weight is q = floor(2^40 * exp(z - z_max)) with z = logit / temperature and exp a fixed polynomial (not
// libm's or CUDA's expf, which differ in the last bits); tokens more than 28 nats below the best get weight 0 (below
// 2^-40 of it: over 200064 tokens at most 2e-7 of the mass). Order of the candidates: z descending, then id
// ascending, as one 64-bit key per token.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MXLM_HD __host__ __device__ __forceinline__
#else
#define MXLM_HD inline __attribute__((always_inline))  // into the FMA clone of sampling.cpp's hot loop
#endif

namespace mxlm::backend {

struct SampleParams {
  float temperature = 0.0f;  // 0: greedy
  int32_t top_k = 0;         // <= 0: off
  float top_p = 1.0f;        // (0, 1]
  float min_p = 0.0f;        // [0, 1]
  uint64_t seed = 0;         // the request's random stream
  uint64_t counter = 0;      // which draw of that stream (the engine: the request's n-th sampled token)
};

}  // namespace mxlm::backend

namespace mxlm::backend::sampling {

constexpr float kWeightScale = 1099511627776.0f;  // 2^40
constexpr float kWeightCutoff = -28.0f;           // z - z_max below this: weight 0

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; Random123's constants).
struct Philox4 {
  uint32_t v[4];
};
MXLM_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * ctr.v[0];
    const uint64_t p1 = static_cast<uint64_t>(kM1) * ctr.v[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    ctr = Philox4{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
    k0 += kW0;
    k1 += kW1;
  }
  return ctr;
}

// 64 random bits of draw `counter` of the stream `seed`: Philox keyed by the seed, counter (counter, 0, 0).
MXLM_HD uint64_t random_u64(uint64_t seed, uint64_t counter) {
  const Philox4 r =
      philox4x32_10(Philox4{{static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u}},
                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return (static_cast<uint64_t>(r.v[1]) << 32) | r.v[0];
}

// floor(a * b / 2^64): a uniform draw in [0, b) from 64 random bits a.
MXLM_HD uint64_t mul_hi_u64(uint64_t a, uint64_t b) {
#ifdef __CUDA_ARCH__
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

MXLM_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
MXLM_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MXLM_HD float fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
MXLM_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// 1 / temperature, once per row: every token's logit is multiplied by it (a product, not a quotient per token).
MXLM_HD float inverse_temperature(float temperature) { return div_rn(1.0f, temperature); }

// The temperature-scaled logit: NaN counts as -inf, -0 as +0 (so that equal values have equal keys).
MXLM_HD float scaled_logit(float logit, float inv_temperature) {
  float z = mul_rn(logit, inv_temperature);
  if (z != z) z = -INFINITY;
  if (z == 0.0f) z = 0.0f;
  return z;
}

// The bits of a float and back, on host and device alike.
MXLM_HD uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
#endif
}
MXLM_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#endif
}

// Order key of a scaled logit: a larger key is a larger z.
MXLM_HD uint32_t float_key(float z) {
  const uint32_t u = float_bits(z);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The candidate order as one number: larger = earlier (z descending, then id ascending). Unique per token.
MXLM_HD uint64_t order_key(float z, uint32_t id) {
  return (static_cast<uint64_t>(float_key(z)) << 32) | (0xFFFFFFFFu - id);
}

// exp(d) for d in [kWeightCutoff, 0] (callers check the range): 2^n * 2^f with n = round(d log2 e), |f| <= 1/2, 2^f by
// its Taylor polynomial of degree 7 (truncation error < 6e-9; with f32 rounding a few ulps), every step an exactly
// rounded operation.
MXLM_HD float weight_exp(float d) {
  constexpr float kLog2e = 1.44269504088896341f;
  const float n = rintf(mul_rn(d, kLog2e));
  const float f = fma_rn(d, kLog2e, -n);
  // c_k = ln(2)^k / k!
  float p = 1.5252733804059841e-05f;
  p = fma_rn(p, f, 1.5403530393381610e-04f);
  p = fma_rn(p, f, 1.3333558146428443e-03f);
  p = fma_rn(p, f, 9.6181291076284772e-03f);
  p = fma_rn(p, f, 5.5504108664821580e-02f);
  p = fma_rn(p, f, 2.4022650695910071e-01f);
  p = fma_rn(p, f, 6.9314718055994531e-01f);
  p = fma_rn(p, f, 1.0f);
  // * 2^n, n in [-41, 0]: a normal power of two, so the product is exact (no ldexpf: a call on the device).
  const float e = mul_rn(p, bits_float(static_cast<uint32_t>(static_cast<int>(n) + 127) << 23));
  return e < 1.0f ? e : 1.0f;
}

// The relative probability of a token whose scaled logit is z, the best one's being z_max (is_best: the token's key
// equals the best key, which makes it 1 even when z_max is infinite).
MXLM_HD float relative_prob(float z, float z_max, bool is_best) {
  if (is_best) return 1.0f;
  const float d = sub_rn(z, z_max);
  if (!(d >= kWeightCutoff)) return 0.0f;  // NaN (infinite z_max) too
  return weight_exp(d);
}

MXLM_HD uint64_t integer_weight(float relative) { return static_cast<uint64_t>(mul_rn(relative, kWeightScale)); }

// The top-p mass to reach among candidates of total mass `total`: ceil(top_p * total), within [1, total].
MXLM_HD uint64_t top_p_target(float top_p, uint64_t total) {
  const double t = ceil(static_cast<double>(top_p) * static_cast<double>(total));
  uint64_t target = t >= 18446744073709551615.0 ? total : static_cast<uint64_t>(t);
  if (target > total) target = total;
  if (target < 1) target = 1;
  return target;
}

}  // namespace mxlm::backend::sampling
