// AVX2 (+F16C) block kernels: the AVX-512 kernels' algorithm (see mxfp4_avx512.cpp for the rounding trick)
// on 8-lane vectors. Compiled without -mavx2: every function carries the target attribute.
#include <immintrin.h>

#include <bit>
#include <cmath>

#include "core/dtype.h"
#include "mx/kernels.h"

#if defined(__x86_64__)

#define MXLM_AVX2 __attribute__((target("avx2,f16c")))

namespace mxlm::mx::avx2 {
namespace {

using detail::pow2;

struct Rounded {
  __m256i code;      // magnitude code 0..7
  __m256 magnitude;  // its value
};

MXLM_AVX2 inline Rounded round_magnitude(__m256 y) {
  const __m256 abs_y = _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(y), _mm256_set1_epi32(0x7fffffff)));
  const __m256 a = _mm256_min_ps(abs_y, _mm256_set1_ps(8.0f));
  const __m256i a_bits = _mm256_castps_si256(a);
  const __m256i exp_bits =
      _mm256_and_si256(_mm256_max_epi32(a_bits, _mm256_set1_epi32(0x3f800000)), _mm256_set1_epi32(0x7f800000));
  const __m256i c_bits = _mm256_add_epi32(exp_bits, _mm256_set1_epi32(22 << 23));
  const __m256 c = _mm256_castsi256_ps(c_bits);
  const __m256 sum = _mm256_add_ps(a, c);
  const __m256i q = _mm256_sub_epi32(_mm256_castps_si256(sum), c_bits);
  const __m256i two_e = _mm256_sub_epi32(_mm256_srli_epi32(exp_bits, 22), _mm256_set1_epi32(254));
  Rounded r;
  r.code = _mm256_min_epi32(_mm256_add_epi32(q, two_e), _mm256_set1_epi32(7));
  r.magnitude = _mm256_min_ps(_mm256_sub_ps(sum, c), _mm256_set1_ps(6.0f));
  return r;
}

MXLM_AVX2 inline __m256i signed_codes(__m256 y) {
  const __m256i code = round_magnitude(y).code;
  const __m256i negative = _mm256_srai_epi32(_mm256_castps_si256(y), 31);
  const __m256i nonzero = _mm256_cmpgt_epi32(code, _mm256_setzero_si256());
  return _mm256_or_si256(code, _mm256_and_si256(_mm256_and_si256(negative, nonzero), _mm256_set1_epi32(8)));
}

MXLM_AVX2 inline __m256 qdq8(__m256 x, __m256 inv_scale, __m256 scale) {
  const __m256 magnitude = round_magnitude(_mm256_mul_ps(x, inv_scale)).magnitude;
  const __m256i sign = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(INT32_MIN));
  return _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(_mm256_mul_ps(magnitude, scale)), sign));
}

// Max of 32 unsigned 16-bit lanes (all <= 0x7fff) held in two vectors.
MXLM_AVX2 inline uint32_t max_u15(__m256i a, __m256i b) {
  const __m256i m256 = _mm256_max_epu16(a, b);
  const __m128i m128 = _mm_max_epu16(_mm256_castsi256_si128(m256), _mm256_extracti128_si256(m256, 1));
  const __m128i flipped = _mm_xor_si128(m128, _mm_set1_epi16(0x7fff));
  return 0x7fffu ^ (static_cast<uint32_t>(_mm_cvtsi128_si32(_mm_minpos_epu16(flipped))) & 0xffffu);
}

MXLM_AVX2 inline uint32_t max_abs_bits(const __m256* v) {
  const __m256i mask = _mm256_set1_epi32(0x7fffffff);
  __m256i m = _mm256_and_si256(_mm256_castps_si256(v[0]), mask);
  for (int i = 1; i < 4; ++i) m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_castps_si256(v[i]), mask));
  __m128i m128 = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  m128 = _mm_max_epu32(m128, _mm_shuffle_epi32(m128, _MM_SHUFFLE(1, 0, 3, 2)));
  m128 = _mm_max_epu32(m128, _mm_shuffle_epi32(m128, _MM_SHUFFLE(2, 3, 0, 1)));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m128));
}

MXLM_AVX2 inline __m256 bf16_to_f32(__m128i v) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// The high halves (bf16, exact here) of four vectors of 8 f32, in order, stored as 32 words.
MXLM_AVX2 inline void store_bf16_exact(const __m256* v, uint16_t* out) {
  for (int h = 0; h < 2; ++h) {
    const __m256i a = _mm256_srli_epi32(_mm256_castps_si256(v[2 * h]), 16);
    const __m256i b = _mm256_srli_epi32(_mm256_castps_si256(v[2 * h + 1]), 16);
    const __m256i words = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), _MM_SHUFFLE(3, 1, 2, 0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * h), words);
  }
}

// 32 codes (four vectors of 8 int32, element order) to 16 packed bytes, even element in the low nibble.
MXLM_AVX2 inline void store_packed(const __m256i* codes, uint8_t* packed) {
  const __m256i ab = _mm256_packus_epi32(codes[0], codes[1]);  // per lane: a0-3 b0-3 | a4-7 b4-7
  const __m256i cd = _mm256_packus_epi32(codes[2], codes[3]);
  const __m256i abcd = _mm256_packus_epi16(ab, cd);  // lane 0: a0-3 b0-3 c0-3 d0-3, lane 1: the 4-7s
  const __m256i bytes = _mm256_permutevar8x32_epi32(abcd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  const __m256i pairs = _mm256_and_si256(_mm256_or_si256(bytes, _mm256_srli_epi16(bytes, 4)), _mm256_set1_epi16(0xff));
  const __m128i out = _mm_packus_epi16(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(packed), out);
}

MXLM_AVX2 inline void quantize_block(const __m256* v, int e, uint8_t* packed) {
  const __m256 inv_scale = _mm256_set1_ps(pow2(-e));
  __m256i codes[4];
  for (int i = 0; i < 4; ++i) codes[i] = signed_codes(_mm256_mul_ps(v[i], inv_scale));
  store_packed(codes, packed);
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

MXLM_AVX2 void quantize_f32(const float* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales, ScaleRule rule) {
  const size_t blocks = rows * (k / kBlockSize);
  for (size_t b = 0; b < blocks; ++b) {
    const float* src = x + b * kBlockSize;
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(src + 8 * i);
    const uint32_t amax = max_abs_bits(v);
    if (amax >= 0x7f800000u) fail_block("quantize_f32", src, b * kBlockSize, k, widen_f32);
    const int e = detail::scale_exponent_from_bits(amax, rule);
    quantize_block(v, e, packed + b * (kBlockSize / 2));
    scales[b] = export_scale_byte(e);
  }
}

// Loads 32 16-bit values; returns the max of their magnitude bits.
MXLM_AVX2 inline uint32_t load_half_block(const uint16_t* src, __m256i* raw) {
  raw[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  raw[1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16));
  const __m256i mask = _mm256_set1_epi16(0x7fff);
  return max_u15(_mm256_and_si256(raw[0], mask), _mm256_and_si256(raw[1], mask));
}

MXLM_AVX2 inline void widen_bf16_block(const __m256i* raw, __m256* v) {
  for (int h = 0; h < 2; ++h) {
    v[2 * h] = bf16_to_f32(_mm256_castsi256_si128(raw[h]));
    v[2 * h + 1] = bf16_to_f32(_mm256_extracti128_si256(raw[h], 1));
  }
}

MXLM_AVX2 void quantize_bf16(const uint16_t* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales,
                             ScaleRule rule) {
  const size_t blocks = rows * (k / kBlockSize);
  for (size_t b = 0; b < blocks; ++b) {
    const uint16_t* src = x + b * kBlockSize;
    __m256i raw[2];
    const uint32_t amax = load_half_block(src, raw);
    if (amax >= 0x7f80u) fail_block("quantize_bf16", src, b * kBlockSize, k, widen_bf16);
    const int e = detail::scale_exponent_from_bits(amax << 16, rule);
    __m256 v[4];
    widen_bf16_block(raw, v);
    quantize_block(v, e, packed + b * (kBlockSize / 2));
    scales[b] = export_scale_byte(e);
  }
}

MXLM_AVX2 void quantize_f16(const uint16_t* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales,
                            ScaleRule rule) {
  const size_t blocks = rows * (k / kBlockSize);
  for (size_t b = 0; b < blocks; ++b) {
    const uint16_t* src = x + b * kBlockSize;
    __m256i raw[2];
    const uint32_t amax = load_half_block(src, raw);
    if (amax >= 0x7c00u) fail_block("quantize_f16", src, b * kBlockSize, k, widen_f16);
    const uint32_t amax_f32 = std::bit_cast<uint32_t>(mxlm::f16_to_f32(static_cast<uint16_t>(amax)));
    const int e = detail::scale_exponent_from_bits(amax_f32, rule);
    __m256 v[4];
    for (int h = 0; h < 2; ++h) {
      v[2 * h] = _mm256_cvtph_ps(_mm256_castsi256_si128(raw[h]));
      v[2 * h + 1] = _mm256_cvtph_ps(_mm256_extracti128_si256(raw[h], 1));
    }
    quantize_block(v, e, packed + b * (kBlockSize / 2));
    scales[b] = export_scale_byte(e);
  }
}

// The 32 values of one packed block times its scale, as four vectors of 8 f32.
MXLM_AVX2 inline void dequantize_block(const uint8_t* packed, uint8_t scale_byte, __m256* v) {
  const __m256 magnitudes = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
  const __m256i words = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed)));
  const __m256i codes = _mm256_or_si256(_mm256_and_si256(words, _mm256_set1_epi16(0x0f)),
                                        _mm256_slli_epi16(_mm256_srli_epi16(words, 4), 8));
  const __m256 scale = _mm256_set1_ps(e8m0_value(scale_byte));  // NaN for 255: NaN * v is that same NaN
  const __m128i halves[2] = {_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1)};
  for (int i = 0; i < 4; ++i) {
    const __m128i eight = (i % 2 == 0) ? halves[i / 2] : _mm_srli_si128(halves[i / 2], 8);
    const __m256i code = _mm256_cvtepu8_epi32(eight);
    const __m256 magnitude = _mm256_permutevar8x32_ps(magnitudes, code);  // uses the low 3 bits
    const __m256i sign = _mm256_slli_epi32(_mm256_srli_epi32(code, 3), 31);
    v[i] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(magnitude), sign)), scale);
  }
}

MXLM_AVX2 void dequantize_f32(const uint8_t* packed, const uint8_t* scales, size_t rows, size_t k, float* out) {
  const size_t blocks = rows * (k / kBlockSize);
  for (size_t b = 0; b < blocks; ++b) {
    __m256 v[4];
    dequantize_block(packed + b * (kBlockSize / 2), scales[b], v);
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + b * kBlockSize + 8 * i, v[i]);
  }
}

MXLM_AVX2 void dequantize_bf16(const uint8_t* packed, const uint8_t* scales, size_t rows, size_t k, uint16_t* out) {
  const size_t blocks = rows * (k / kBlockSize);
  for (size_t b = 0; b < blocks; ++b) {
    __m256 v[4];
    dequantize_block(packed + b * (kBlockSize / 2), scales[b], v);
    store_bf16_exact(v, out + b * kBlockSize);
  }
}

MXLM_AVX2 void qdq_f32(float* x, size_t n, ScaleRule rule) {
  for (size_t b = 0; b < n / kBlockSize; ++b) {
    float* p = x + b * kBlockSize;
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(p + 8 * i);
    const uint32_t amax = max_abs_bits(v);
    if (amax >= 0x7f800000u) {  // NaN or Inf: rare, the reference's rules
      ref::qdq_f32(p, kBlockSize, rule);
      continue;
    }
    const int e = detail::scale_exponent_from_bits(amax, rule);
    const __m256 scale = _mm256_set1_ps(pow2(e)), inv_scale = _mm256_set1_ps(pow2(-e));
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(p + 8 * i, qdq8(v[i], inv_scale, scale));
  }
}

MXLM_AVX2 void qdq_bf16(uint16_t* x, size_t n, ScaleRule rule) {
  for (size_t b = 0; b < n / kBlockSize; ++b) {
    uint16_t* p = x + b * kBlockSize;
    __m256i raw[2];
    const uint32_t amax = load_half_block(p, raw);
    if (amax >= 0x7f80u) {
      ref::qdq_bf16(p, kBlockSize, rule);
      continue;
    }
    const int e = detail::scale_exponent_from_bits(amax << 16, rule);
    const __m256 scale = _mm256_set1_ps(pow2(e)), inv_scale = _mm256_set1_ps(pow2(-e));
    __m256 v[4];
    widen_bf16_block(raw, v);
    for (int i = 0; i < 4; ++i) v[i] = qdq8(v[i], inv_scale, scale);
    store_bf16_exact(v, p);
  }
}

}  // namespace
}  // namespace mxlm::mx::avx2

namespace mxlm::mx::detail {
namespace {
const Kernels kAvx2 = {Isa::Avx2,          avx2::quantize_f32,   avx2::quantize_bf16,
                       avx2::quantize_f16, avx2::dequantize_f32, avx2::dequantize_bf16,
                       avx2::qdq_f32,      avx2::qdq_bf16};
}  // namespace
const Kernels* const kAvx2Kernels = &kAvx2;
}  // namespace mxlm::mx::detail

#else
namespace mxlm::mx::detail {
const Kernels* const kAvx2Kernels = nullptr;
}  // namespace mxlm::mx::detail
#endif
