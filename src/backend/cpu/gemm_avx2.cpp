// AVX2 + FMA + F16C GEMM kernels: the same schedule and summation structure as gemm_avx512.cpp with
// 8 lanes (each output: 8 lane sums over the whole of K, then a fixed tree), so rows of y are independent of
// the other rows of x and of the thread count. MXFP4 decode: the 8 E2M1 magnitudes times the block scale
// are picked with vpermps by the low 3 bits of each code, the sign bit is moved to bit 31 and xored in.
// Only functions marked MXLM_AVX2 use these instructions; gemm.cpp calls them only where the CPU has them.
#include <immintrin.h>
#include <omp.h>

#include <vector>

#include "backend/cpu/gemm_kernels.h"

#define MXLM_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace mxlm::cpu::avx2 {
namespace {

// How far ahead of the current block each MXFP4 row is prefetched: the streaming schedule walks 8 rows at
// once, more streams than the hardware prefetcher follows well (measured: ~10% on the dev VM).
constexpr size_t kPrefetchBytes = 256;

inline size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

// Up to 8 floats from p, zeros after them; never reads past p + count.
MXLM_AVX2 inline __m256 load_partial(const float* p, size_t count) {
  if (count == 8) return _mm256_loadu_ps(p);
  alignas(32) float lanes[8] = {};
  for (size_t e = 0; e < count; ++e) lanes[e] = p[e];
  return _mm256_load_ps(lanes);
}

// Weight sources. load32 gives the 32 weights of a row at column kk (a full block, kk % 32 == 0) as four
// vectors in the order the matching x layout uses; tail8 gives up to 8 weights of the K tail in natural
// order (missing lanes zero).
struct F32Weights {
  static constexpr bool kEvenOdd = false;
  using Row = const float*;
  const float* w;
  size_t ld;
  Row row(size_t r) const { return w + r * ld; }
  MXLM_AVX2 void load32(Row p, size_t kk, __m256 v[4]) const {
    for (int q = 0; q < 4; ++q) v[q] = _mm256_loadu_ps(p + kk + 8 * q);
  }
  MXLM_AVX2 __m256 tail8(Row p, size_t kk, size_t count) const { return load_partial(p + kk, count); }
};

// Even/odd order for a block: v[0] = even k of elements 0..15, v[1] = even k of 16..31, v[2], v[3] the odd.
struct Bf16Weights {
  static constexpr bool kEvenOdd = true;
  using Row = const uint16_t*;
  const uint16_t* w;
  size_t ld;
  Row row(size_t r) const { return w + r * ld; }
  // A bf16 pair in a 32-bit lane: shifting left gives the even element as f32, masking the high half the odd.
  MXLM_AVX2 void load32(Row p, size_t kk, __m256 v[4]) const {
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    for (int h = 0; h < 2; ++h) {
      const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + kk + 16 * h));
      v[h] = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
      v[2 + h] = _mm256_castsi256_ps(_mm256_and_si256(pairs, high));
    }
  }
  MXLM_AVX2 __m256 tail8(Row p, size_t kk, size_t count) const {
    alignas(16) uint16_t bits[8] = {};
    for (size_t e = 0; e < count; ++e) bits[e] = p[kk + e];
    const __m128i h = _mm_load_si128(reinterpret_cast<const __m128i*>(bits));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
};

struct F16Weights {
  static constexpr bool kEvenOdd = false;
  using Row = const uint16_t*;
  const uint16_t* w;
  size_t ld;
  Row row(size_t r) const { return w + r * ld; }
  MXLM_AVX2 void load32(Row p, size_t kk, __m256 v[4]) const {
    for (int q = 0; q < 4; ++q)
      v[q] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + kk + 8 * q)));
  }
  MXLM_AVX2 __m256 tail8(Row p, size_t kk, size_t count) const {
    alignas(16) uint16_t bits[8] = {};
    for (size_t e = 0; e < count; ++e) bits[e] = p[kk + e];
    return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(bits)));
  }
};

struct Mxfp4Weights {
  static constexpr bool kEvenOdd = true;
  struct Row {
    const uint8_t* packed;
    const uint8_t* scales;
  };
  const uint8_t* packed;  // [n, k/2]
  const uint8_t* scales;  // [n, k/32]
  size_t k;
  Row row(size_t r) const { return {packed + r * (k / 2), scales + r * (k / 32)}; }
  // Magnitudes 0..7 times the block scale (exact), picked by the low 3 bits of each lane; the code's sign
  // bit (bit 3 of the low nibble, bit 7 of the byte for the high nibble) is shifted to bit 31 and xored in.
  MXLM_AVX2 void load32(const Row& p, size_t kk, __m256 v[4]) const {
    _mm_prefetch(reinterpret_cast<const char*>(p.packed + kk / 2 + kPrefetchBytes), _MM_HINT_T0);
    const __m256 table = _mm256_mul_ps(_mm256_loadu_ps(kE2m1Values), _mm256_set1_ps(kE8m0Values[p.scales[kk / 32]]));
    const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    for (int h = 0; h < 2; ++h) {
      const __m256i bytes =
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.packed + kk / 2 + 8 * h)));
      const __m256i high = _mm256_srli_epi32(bytes, 4);
      const __m256 even = _mm256_permutevar8x32_ps(table, bytes);
      const __m256 odd = _mm256_permutevar8x32_ps(table, high);
      v[h] = _mm256_xor_ps(even, _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(bytes, 28), sign)));
      v[2 + h] = _mm256_xor_ps(odd, _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(bytes, 24), sign)));
    }
  }
  // K % 32 == 0 for MXFP4, so there is never a tail.
  MXLM_AVX2 __m256 tail8(const Row&, size_t, size_t) const { return _mm256_setzero_ps(); }
};

MXLM_AVX2 inline float sum_lanes(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// y[MR, NR] (row stride ldy) = x[MR, k] (row stride ldx) . W rows r0..r0+NR over columns [0, k).
template <int MR, int NR, class W>
MXLM_AVX2 inline void tile(const float* x, size_t ldx, const W& w, size_t r0, size_t k, float* y, size_t ldy) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  typename W::Row row[NR];
  for (int j = 0; j < NR; ++j) row[j] = w.row(r0 + j);
  size_t kk = 0;
  for (; kk + 32 <= k; kk += 32) {
    for (int j = 0; j < NR; ++j) {
      __m256 v[4];
      w.load32(row[j], kk, v);
      for (int i = 0; i < MR; ++i)
        for (int q = 0; q < 4; ++q)
          acc[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * ldx + kk + 8 * q), v[q], acc[i][j]);
    }
  }
  for (; kk < k; kk += 8) {
    const size_t count = min_size(8, k - kk);
    for (int j = 0; j < NR; ++j) {
      const __m256 wv = w.tail8(row[j], kk, count);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(load_partial(x + i * ldx + kk, count), wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[i * ldy + j] = sum_lanes(acc[i][j]);
}

// Widest tile that keeps accumulators and the decoded weights in the 16 vector registers.
template <int MR>
constexpr int kTileRows = MR <= 2 ? 4 : 2;

// Rows [r_begin, r_end) of W against MR rows of x.
template <int MR, class W>
MXLM_AVX2 void rows_for_mr(const float* x, size_t ldx, const W& w, size_t r_begin, size_t r_end, size_t k, float* y,
                           size_t ldy) {
  constexpr int NR = kTileRows<MR>;
  size_t r = r_begin;
  for (; r + NR <= r_end; r += NR) tile<MR, NR>(x, ldx, w, r, k, y + (r - r_begin), ldy);
  for (; r < r_end; ++r) tile<MR, 1>(x, ldx, w, r, k, y + (r - r_begin), ldy);
}

// All m rows of x against W rows [r_begin, r_end); y points at the column r_begin of row 0.
template <class W>
MXLM_AVX2 void rows(const float* x, size_t m, size_t ldx, const W& w, size_t r_begin, size_t r_end, size_t k, float* y,
                    size_t ldy) {
  size_t i = 0;
  for (; i + 4 <= m; i += 4) rows_for_mr<4>(x + i * ldx, ldx, w, r_begin, r_end, k, y + i * ldy, ldy);
  const float* xr = x + i * ldx;
  float* yr = y + i * ldy;
  switch (m - i) {
    case 3:
      rows_for_mr<3>(xr, ldx, w, r_begin, r_end, k, yr, ldy);
      break;
    case 2:
      rows_for_mr<2>(xr, ldx, w, r_begin, r_end, k, yr, ldy);
      break;
    case 1:
      rows_for_mr<1>(xr, ldx, w, r_begin, r_end, k, yr, ldy);
      break;
    default:
      break;
  }
}

// Threads only when there is enough work to pay for waking them.
bool worth_threading(size_t m, size_t k, size_t n) { return m * k * n >= (size_t{1} << 18); }

template <class W>
void run(const float* x, size_t m, size_t k, const W& w, size_t n, float* y) {
  if constexpr (W::kEvenOdd) {
    static thread_local std::vector<float> reordered;
    reordered.resize(m * k);
    permute_even_odd(x, m, k, reordered.data());
    x = reordered.data();
  }
  // Tiles of 8 weight rows keep the register tiles full; threads take 4 tiles at a time, dynamically, so a
  // core that is busy with something else does not hold up the whole call.
  const long long tiles = static_cast<long long>((n + 7) / 8);
#pragma omp parallel for schedule(dynamic, 4) if (worth_threading(m, k, n))
  for (long long t = 0; t < tiles; ++t) {
    const size_t r0 = static_cast<size_t>(t) * 8;
    rows(x, m, k, w, r0, min_size(n, r0 + 8), k, y + r0, n);
  }
}

}  // namespace

void gemm_f32(const float* x, size_t m, size_t k, const float* w, size_t n, float* y) {
  run(x, m, k, F32Weights{w, k}, n, y);
}

void gemm_bf16(const float* x, size_t m, size_t k, const uint16_t* w, size_t n, float* y) {
  run(x, m, k, Bf16Weights{w, k}, n, y);
}

void gemm_f16(const float* x, size_t m, size_t k, const uint16_t* w, size_t n, float* y) {
  run(x, m, k, F16Weights{w, k}, n, y);
}

void gemm_mxfp4(const float* x, size_t m, size_t k, const uint8_t* w_packed, const uint8_t* w_scales, size_t n,
                float* y) {
  run(x, m, k, Mxfp4Weights{w_packed, w_scales, k}, n, y);
}

}  // namespace mxlm::cpu::avx2
