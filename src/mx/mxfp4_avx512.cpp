// AVX-512 (F + BW + VL) block kernels. Compiled without -mavx512 flags: every function carries the target
// attribute and is only reached through the dispatch table after a CPU check.
//
// Element rounding without a table: for a = |y| (clamped to 8) let E = max(floor(log2 a), 0) and
// C = 2^(E+22), whose ulp is 2^(E-1), exactly the E2M1 step in a's binade. a + C rounds a to that step with
// the FPU's round-to-nearest-even, and the rounded value's step index q = bits(a+C) - bits(C) gives the
// code q + 2E (capped at 7 = saturation at 6). Parity of q is the parity of the code, so FPU ties-to-even
// is E2M1 ties-to-even.
#include <immintrin.h>

#include <bit>
#include <cmath>

#include "core/dtype.h"
#include "mx/kernels.h"

#if defined(__x86_64__)

// GCC 12's AVX-512 headers start some intrinsics from _mm512_undefined_*() and then warn about it
// (GCC bug 105593); the warning is about the header, not this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define MXLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

namespace mxlm::mx::avx512 {
namespace {

using detail::pow2;

struct Rounded {
  __m512i code;      // magnitude code 0..7
  __m512 magnitude;  // its value
};

MXLM_AVX512 inline Rounded round_magnitude(__m512 y) {
  const __m512 a = _mm512_min_ps(_mm512_abs_ps(y), _mm512_set1_ps(8.0f));
  const __m512i a_bits = _mm512_castps_si512(a);
  const __m512i exp_bits =
      _mm512_and_si512(_mm512_max_epi32(a_bits, _mm512_set1_epi32(0x3f800000)), _mm512_set1_epi32(0x7f800000));
  const __m512i c_bits = _mm512_add_epi32(exp_bits, _mm512_set1_epi32(22 << 23));
  const __m512 c = _mm512_castsi512_ps(c_bits);
  const __m512 sum = _mm512_add_ps(a, c);
  const __m512i q = _mm512_sub_epi32(_mm512_castps_si512(sum), c_bits);
  const __m512i two_e = _mm512_sub_epi32(_mm512_srli_epi32(exp_bits, 22), _mm512_set1_epi32(254));
  Rounded r;
  r.code = _mm512_min_epi32(_mm512_add_epi32(q, two_e), _mm512_set1_epi32(7));
  r.magnitude = _mm512_min_ps(_mm512_sub_ps(sum, c), _mm512_set1_ps(6.0f));
  return r;
}

// Signed codes of 16 values y = x / scale (the sign bit only on non-zero magnitudes).
MXLM_AVX512 inline __m512i signed_codes(__m512 y) {
  const __m512i code = round_magnitude(y).code;
  const __mmask16 negative = _mm512_test_epi32_mask(_mm512_castps_si512(y), _mm512_set1_epi32(INT32_MIN));
  const __mmask16 nonzero = _mm512_test_epi32_mask(code, code);
  return _mm512_mask_or_epi32(code, negative & nonzero, code, _mm512_set1_epi32(8));
}

// QDQ of 16 values: sign kept (also on zero), magnitude * scale.
MXLM_AVX512 inline __m512 qdq16(__m512 x, __m512 inv_scale, __m512 scale) {
  const __m512 magnitude = round_magnitude(_mm512_mul_ps(x, inv_scale)).magnitude;
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(_mm512_mul_ps(magnitude, scale)), sign));
}

// Max of 32 unsigned 16-bit lanes (all <= 0x7fff): phminposuw on the complement.
MXLM_AVX512 inline uint32_t max_u15(__m512i v) {
  const __m256i m256 = _mm256_max_epu16(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
  const __m128i m128 = _mm_max_epu16(_mm256_castsi256_si128(m256), _mm256_extracti128_si256(m256, 1));
  const __m128i flipped = _mm_xor_si128(m128, _mm_set1_epi16(0x7fff));
  return 0x7fffu ^ (static_cast<uint32_t>(_mm_cvtsi128_si32(_mm_minpos_epu16(flipped))) & 0xffffu);
}

// Max of |x| bits over two vectors of 16 f32.
MXLM_AVX512 inline uint32_t max_abs_bits(__m512 lo, __m512 hi) {
  const __m512i mask = _mm512_set1_epi32(0x7fffffff);
  const __m512i m = _mm512_max_epu32(_mm512_and_si512(_mm512_castps_si512(lo), mask),
                                     _mm512_and_si512(_mm512_castps_si512(hi), mask));
  return _mm512_reduce_max_epu32(m);
}

MXLM_AVX512 inline __m512 bf16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// The high halves (bf16, exact here) of two vectors of 16 f32, in order.
MXLM_AVX512 inline __m512i f32_to_bf16_exact(__m512 lo, __m512 hi) {
  const __m512i odd_words = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27,
                                             25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  return _mm512_permutex2var_epi16(_mm512_castps_si512(lo), odd_words, _mm512_castps_si512(hi));
}

// 32 codes (two vectors of 16 int32, element order) to 16 packed bytes, even element in the low nibble.
MXLM_AVX512 inline void store_packed(__m512i codes_lo, __m512i codes_hi, uint8_t* packed) {
  const __m256i bytes =
      _mm256_set_m128i(_mm512_cvtepi32_epi8(codes_hi), _mm512_cvtepi32_epi8(codes_lo));  // one code per byte
  const __m256i pairs = _mm256_or_si256(bytes, _mm256_srli_epi16(bytes, 4));             // low byte: even | odd << 4
  _mm_storeu_si128(reinterpret_cast<__m128i*>(packed), _mm256_cvtepi16_epi8(pairs));
}

MXLM_AVX512 inline void quantize_block(__m512 lo, __m512 hi, int e, uint8_t* packed) {
  const __m512 inv_scale = _mm512_set1_ps(pow2(-e));
  store_packed(signed_codes(_mm512_mul_ps(lo, inv_scale)), signed_codes(_mm512_mul_ps(hi, inv_scale)), packed);
}

template <typename T>
[[noreturn]] void fail_block(const char* what, const T* block, size_t first, size_t k, float (*widen)(T)) {
  for (size_t i = 0; i < kBlockSize; ++i) {
    const float v = widen(block[i]);
    if (!std::isfinite(v)) detail::fail_non_finite(what, first + i, k, v);
  }
  detail::fail_non_finite(what, first, k, widen(block[0]));  // not reached: the caller saw a non-finite value
}

float widen_f32(float v) { return v; }
float widen_bf16(uint16_t v) { return mxlm::bf16_to_f32(v); }
float widen_f16(uint16_t v) { return mxlm::f16_to_f32(v); }

MXLM_AVX512 void quantize_f32(const float* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales, ScaleRule rule) {
  const size_t blocks = rows * (k / kBlockSize);
  for (size_t b = 0; b < blocks; ++b) {
    const float* src = x + b * kBlockSize;
    const __m512 lo = _mm512_loadu_ps(src), hi = _mm512_loadu_ps(src + 16);
    const uint32_t amax = max_abs_bits(lo, hi);
    if (amax >= 0x7f800000u) fail_block("quantize_f32", src, b * kBlockSize, k, widen_f32);
    const int e = detail::scale_exponent_from_bits(amax, rule);
    quantize_block(lo, hi, e, packed + b * (kBlockSize / 2));
    scales[b] = export_scale_byte(e);
  }
}

MXLM_AVX512 void quantize_bf16(const uint16_t* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales,
                               ScaleRule rule) {
  const size_t blocks = rows * (k / kBlockSize);
  for (size_t b = 0; b < blocks; ++b) {
    const uint16_t* src = x + b * kBlockSize;
    const __m512i raw = _mm512_loadu_si512(src);
    const uint32_t amax = max_u15(_mm512_and_si512(raw, _mm512_set1_epi16(0x7fff)));
    if (amax >= 0x7f80u) fail_block("quantize_bf16", src, b * kBlockSize, k, widen_bf16);
    const int e = detail::scale_exponent_from_bits(amax << 16, rule);
    quantize_block(bf16_to_f32(_mm512_castsi512_si256(raw)), bf16_to_f32(_mm512_extracti64x4_epi64(raw, 1)), e,
                   packed + b * (kBlockSize / 2));
    scales[b] = export_scale_byte(e);
  }
}

MXLM_AVX512 void quantize_f16(const uint16_t* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales,
                              ScaleRule rule) {
  const size_t blocks = rows * (k / kBlockSize);
  for (size_t b = 0; b < blocks; ++b) {
    const uint16_t* src = x + b * kBlockSize;
    const __m512i raw = _mm512_loadu_si512(src);
    const uint32_t amax = max_u15(_mm512_and_si512(raw, _mm512_set1_epi16(0x7fff)));
    if (amax >= 0x7c00u) fail_block("quantize_f16", src, b * kBlockSize, k, widen_f16);
    const uint32_t amax_f32 = std::bit_cast<uint32_t>(mxlm::f16_to_f32(static_cast<uint16_t>(amax)));
    const int e = detail::scale_exponent_from_bits(amax_f32, rule);
    quantize_block(_mm512_cvtph_ps(_mm512_castsi512_si256(raw)), _mm512_cvtph_ps(_mm512_extracti64x4_epi64(raw, 1)), e,
                   packed + b * (kBlockSize / 2));
    scales[b] = export_scale_byte(e);
  }
}

// The 32 values of one packed block times its scale, as two vectors of 16 f32.
MXLM_AVX512 inline void dequantize_block(const uint8_t* packed, uint8_t scale_byte, __m512* lo, __m512* hi) {
  const __m512 table = _mm512_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f, -0.0f, -0.5f, -1.0f, -1.5f, -2.0f,
                                      -3.0f, -4.0f, -6.0f);
  const __m256i words = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed)));
  // Each 16-bit word becomes [low nibble, high nibble] as bytes: codes in element order.
  const __m256i codes = _mm256_or_si256(_mm256_and_si256(words, _mm256_set1_epi16(0x0f)),
                                        _mm256_slli_epi16(_mm256_srli_epi16(words, 4), 8));
  const __m512 scale = _mm512_set1_ps(e8m0_value(scale_byte));  // NaN for 255: NaN * v is that same NaN
  *lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(codes)), table), scale);
  *hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(codes, 1)), table), scale);
}

MXLM_AVX512 void dequantize_f32(const uint8_t* packed, const uint8_t* scales, size_t rows, size_t k, float* out) {
  const size_t blocks = rows * (k / kBlockSize);
  for (size_t b = 0; b < blocks; ++b) {
    __m512 lo, hi;
    dequantize_block(packed + b * (kBlockSize / 2), scales[b], &lo, &hi);
    _mm512_storeu_ps(out + b * kBlockSize, lo);
    _mm512_storeu_ps(out + b * kBlockSize + 16, hi);
  }
}

MXLM_AVX512 void dequantize_bf16(const uint8_t* packed, const uint8_t* scales, size_t rows, size_t k, uint16_t* out) {
  const size_t blocks = rows * (k / kBlockSize);
  for (size_t b = 0; b < blocks; ++b) {
    __m512 lo, hi;
    dequantize_block(packed + b * (kBlockSize / 2), scales[b], &lo, &hi);
    _mm512_storeu_si512(out + b * kBlockSize, f32_to_bf16_exact(lo, hi));
  }
}

MXLM_AVX512 void qdq_f32(float* x, size_t n, ScaleRule rule) {
  for (size_t b = 0; b < n / kBlockSize; ++b) {
    float* v = x + b * kBlockSize;
    const __m512 lo = _mm512_loadu_ps(v), hi = _mm512_loadu_ps(v + 16);
    const uint32_t amax = max_abs_bits(lo, hi);
    if (amax >= 0x7f800000u) {  // NaN or Inf: rare, the reference's rules
      ref::qdq_f32(v, kBlockSize, rule);
      continue;
    }
    const int e = detail::scale_exponent_from_bits(amax, rule);
    const __m512 scale = _mm512_set1_ps(pow2(e)), inv_scale = _mm512_set1_ps(pow2(-e));
    _mm512_storeu_ps(v, qdq16(lo, inv_scale, scale));
    _mm512_storeu_ps(v + 16, qdq16(hi, inv_scale, scale));
  }
}

MXLM_AVX512 void qdq_bf16(uint16_t* x, size_t n, ScaleRule rule) {
  for (size_t b = 0; b < n / kBlockSize; ++b) {
    uint16_t* v = x + b * kBlockSize;
    const __m512i raw = _mm512_loadu_si512(v);
    const uint32_t amax = max_u15(_mm512_and_si512(raw, _mm512_set1_epi16(0x7fff)));
    if (amax >= 0x7f80u) {
      ref::qdq_bf16(v, kBlockSize, rule);
      continue;
    }
    const int e = detail::scale_exponent_from_bits(amax << 16, rule);
    const __m512 scale = _mm512_set1_ps(pow2(e)), inv_scale = _mm512_set1_ps(pow2(-e));
    const __m512 lo = qdq16(bf16_to_f32(_mm512_castsi512_si256(raw)), inv_scale, scale);
    const __m512 hi = qdq16(bf16_to_f32(_mm512_extracti64x4_epi64(raw, 1)), inv_scale, scale);
    _mm512_storeu_si512(v, f32_to_bf16_exact(lo, hi));
  }
}

}  // namespace
}  // namespace mxlm::mx::avx512

namespace mxlm::mx::detail {
namespace {
const Kernels kAvx512 = {Isa::Avx512,          avx512::quantize_f32,   avx512::quantize_bf16,
                         avx512::quantize_f16, avx512::dequantize_f32, avx512::dequantize_bf16,
                         avx512::qdq_f32,      avx512::qdq_bf16};
}  // namespace
const Kernels* const kAvx512Kernels = &kAvx512;
}  // namespace mxlm::mx::detail

#else
namespace mxlm::mx::detail {
const Kernels* const kAvx512Kernels = nullptr;
}  // namespace mxlm::mx::detail
#endif
