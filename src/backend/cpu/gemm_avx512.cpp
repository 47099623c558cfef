// AVX-512 GEMM kernels for f32, bf16 and f16 weights (MXFP4 is in gemm_avx512_mxfp4.cpp). The build has no
// -m flags: only the functions marked MXLM_AVX512 use AVX-512, and gemm.cpp calls them only on CPUs that have
// it. Products are f32 x f32 with FMA; weights are widened (bf16, f16) in registers, so each product equals
// the reference one and only the summation order differs (16 lanes, then a tree).
//
// Schedule: OpenMP threads take tiles of 8 weight rows; each tile is decoded in registers once per 32-block
// per group of up to 4 rows of x, and multiplied with them (register tiles of 1-2 x rows x 8 weight rows or
// 3-4 x 4). W is streamed from memory once; for large M the re-decoding per 4 rows of x measured faster
// than decoding into an f32 panel (the decode is cheaper than the panel's extra L2 traffic). Every output
// is summed the same way (16 lane sums over the whole of K, then a fixed tree), so a row of y does not
// depend on the other rows of x or on the thread count.
//
// GCC 12 warns inside its own avx512fintrin.h (the self-initialised __Y of _mm512_undefined_*, GCC bug
// 105593) wherever those intrinsics are inlined; the warning is about the header, not this code.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#include <omp.h>

#include <vector>

#include "backend/cpu/gemm_kernels.h"

#define MXLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

namespace mxlm::cpu::avx512 {
namespace {

inline size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

// Weight sources. load32 gives the 32 weights of row r at column kk (a full block, kk % 32 == 0) as two
// vectors in the order the matching x layout uses; tail16 gives up to 16 weights of the K tail in natural
// order (masked lanes zero).
struct F32Weights {
  static constexpr bool kEvenOdd = false;
  using Row = const float*;
  const float* w;
  size_t ld;
  Row row(size_t r) const { return w + r * ld; }
  MXLM_AVX512 void load32(Row p, size_t kk, __m512& a, __m512& b) const {
    a = _mm512_loadu_ps(p + kk);
    b = _mm512_loadu_ps(p + kk + 16);
  }
  MXLM_AVX512 __m512 tail16(Row p, size_t kk, __mmask16 mask) const { return _mm512_maskz_loadu_ps(mask, p + kk); }
};

struct Bf16Weights {
  static constexpr bool kEvenOdd = true;
  using Row = const uint16_t*;
  const uint16_t* w;
  size_t ld;
  Row row(size_t r) const { return w + r * ld; }
  // A bf16 pair in a 32-bit lane: shifting left gives the even element as f32, masking the high half the odd.
  MXLM_AVX512 void load32(Row p, size_t kk, __m512& a, __m512& b) const {
    const __m512i v = _mm512_loadu_si512(p + kk);
    a = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    b = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  MXLM_AVX512 __m512 tail16(Row p, size_t kk, __mmask16 mask) const {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, p + kk);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
};

struct F16Weights {
  static constexpr bool kEvenOdd = false;
  using Row = const uint16_t*;
  const uint16_t* w;
  size_t ld;
  Row row(size_t r) const { return w + r * ld; }
  MXLM_AVX512 void load32(Row p, size_t kk, __m512& a, __m512& b) const {
    a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + kk)));
    b = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + kk + 16)));
  }
  MXLM_AVX512 __m512 tail16(Row p, size_t kk, __mmask16 mask) const {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p + kk));
  }
};

MXLM_AVX512 inline __mmask16 tail_mask(size_t count) { return static_cast<__mmask16>((1u << count) - 1u); }

// y[MR, NR] (row stride ldy) = x[MR, k] (row stride ldx) . W rows r0..r0+NR over columns [0, k).
template <int MR, int NR, class W>
MXLM_AVX512 inline void tile(const float* x, size_t ldx, const W& w, size_t r0, size_t k, float* y, size_t ldy) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  typename W::Row row[NR];
  for (int j = 0; j < NR; ++j) row[j] = w.row(r0 + j);
  size_t kk = 0;
  for (; kk + 32 <= k; kk += 32) {
    __m512 xa[MR], xb[MR];
    for (int i = 0; i < MR; ++i) {
      xa[i] = _mm512_loadu_ps(x + i * ldx + kk);
      xb[i] = _mm512_loadu_ps(x + i * ldx + kk + 16);
    }
    for (int j = 0; j < NR; ++j) {
      __m512 wa, wb;
      w.load32(row[j], kk, wa, wb);
      for (int i = 0; i < MR; ++i) {
        acc[i][j] = _mm512_fmadd_ps(xa[i], wa, acc[i][j]);
        acc[i][j] = _mm512_fmadd_ps(xb[i], wb, acc[i][j]);
      }
    }
  }
  for (; kk < k; kk += 16) {
    const __mmask16 mask = tail_mask(min_size(16, k - kk));
    __m512 xa[MR];
    for (int i = 0; i < MR; ++i) xa[i] = _mm512_maskz_loadu_ps(mask, x + i * ldx + kk);
    for (int j = 0; j < NR; ++j) {
      const __m512 wa = w.tail16(row[j], kk, mask);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(xa[i], wa, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      const float sum = _mm512_reduce_add_ps(acc[i][j]);
      y[i * ldy + j] = sum;
    }
  }
}

// Widest tile that keeps accumulators, x and the decoded weights in the 32 vector registers.
template <int MR>
constexpr int kTileRows = MR <= 2 ? 8 : 4;

// Rows [r_begin, r_end) of W against MR rows of x.
template <int MR, class W>
MXLM_AVX512 void rows_for_mr(const float* x, size_t ldx, const W& w, size_t r_begin, size_t r_end, size_t k, float* y,
                             size_t ldy) {
  constexpr int NR = kTileRows<MR>;
  size_t r = r_begin;
  for (; r + NR <= r_end; r += NR) tile<MR, NR>(x, ldx, w, r, k, y + (r - r_begin), ldy);
  for (; r < r_end; ++r) tile<MR, 1>(x, ldx, w, r, k, y + (r - r_begin), ldy);
}

// All m rows of x against W rows [r_begin, r_end); y points at the column r_begin of row 0.
template <class W>
MXLM_AVX512 void rows(const float* x, size_t m, size_t ldx, const W& w, size_t r_begin, size_t r_end, size_t k,
                      float* y, size_t ldy) {
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

// --- W4A4 (MXFP4 x and W) with AVX-512 VNNI ------------------------------------------------------------------

#define MXLM_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))

namespace {

// Two blocks (64 codes) of one row: bytes 0-15 the even-k codes of block 0, 16-31 those of block 1, 32-47 and
// 48-63 the odd-k codes. With one block left, block 1 reads as code 0 (value 0).
MXLM_AVX512_VNNI inline __m512i load_codes(const uint8_t* packed, bool two_blocks) {
  const __m256i bytes = two_blocks ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed))
                                   : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed)));
  const __m256i low = _mm256_set1_epi8(0x0f);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(bytes, low)),
                            _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low), 1);
}

// Scale of each int32 lane of the dot product: lanes 0-3 and 8-11 sum block 0, lanes 4-7 and 12-15 block 1.
MXLM_AVX512_VNNI inline __m512 lane_scales(float block0, float block1) {
  return _mm512_mask_blend_ps(0xf0f0, _mm512_set1_ps(block0), _mm512_set1_ps(block1));
}

// y[MR, NR] for x rows (packed xp, scales xs) and W rows r0.. over k.
template <int MR, int NR>
MXLM_AVX512_VNNI void tile_w4a4(const uint8_t* xp, const uint8_t* xs, const uint8_t* wp, const uint8_t* ws, size_t r0,
                                size_t k, float* y, size_t ldy) {
  // Twice the E2M1 magnitudes (unsigned), and twice the signed values, for vpshufb.
  const __m512i magnitude = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, 1, 2, 3, 4, 6, 8, 12));
  const __m512i value = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12));
  const __m512i sign_bit = _mm512_set1_epi8(8);
  const size_t blocks = k / 32, row_bytes = k / 2;
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (size_t b = 0; b < blocks; b += 2) {
    const bool two = b + 1 < blocks;
    __m512i x_magnitude[MR], x_sign[MR];
    __m512 x_scale[MR];
    for (int i = 0; i < MR; ++i) {
      const __m512i codes = load_codes(xp + i * row_bytes + b * 16, two);
      x_magnitude[i] = _mm512_shuffle_epi8(magnitude, codes);
      x_sign[i] = _mm512_and_si512(codes, sign_bit);
      const uint8_t* s = xs + i * blocks + b;
      x_scale[i] = lane_scales(kE8m0Values[s[0]], two ? kE8m0Values[s[1]] : 0.0f);
    }
    for (int j = 0; j < NR; ++j) {
      const uint8_t* wrow = wp + (r0 + j) * row_bytes + b * 16;
      const __m512i codes = load_codes(wrow, two);
      const uint8_t* s = ws + (r0 + j) * blocks + b;
      // The quarter undoes the doubling of both E2M1 values.
      const __m512 w_scale = lane_scales(kE8m0Values[s[0]] * 0.25f, two ? kE8m0Values[s[1]] * 0.25f : 0.0f);
      for (int i = 0; i < MR; ++i) {
        // x * w = |x| * (w with the sign of x folded into its code): unsigned x signed bytes, as vpdpbusd wants.
        const __m512i w_signed = _mm512_shuffle_epi8(value, _mm512_xor_si512(codes, x_sign[i]));
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), x_magnitude[i], w_signed);
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(x_scale[i], w_scale), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int MR>
MXLM_AVX512_VNNI void rows_w4a4(const uint8_t* xp, const uint8_t* xs, const uint8_t* wp, const uint8_t* ws,
                                size_t r_begin, size_t r_end, size_t k, float* y, size_t ldy) {
  size_t r = r_begin;
  for (; r + 4 <= r_end; r += 4) tile_w4a4<MR, 4>(xp, xs, wp, ws, r, k, y + (r - r_begin), ldy);
  for (; r < r_end; ++r) tile_w4a4<MR, 1>(xp, xs, wp, ws, r, k, y + (r - r_begin), ldy);
}

MXLM_AVX512_VNNI void block_w4a4(const uint8_t* xp, const uint8_t* xs, size_t m, size_t k, const uint8_t* wp,
                                 const uint8_t* ws, size_t r_begin, size_t r_end, float* y, size_t n) {
  size_t i = 0;
  for (; i + 2 <= m; i += 2)
    rows_w4a4<2>(xp + i * (k / 2), xs + i * (k / 32), wp, ws, r_begin, r_end, k, y + i * n + r_begin, n);
  if (i < m) rows_w4a4<1>(xp + i * (k / 2), xs + i * (k / 32), wp, ws, r_begin, r_end, k, y + i * n + r_begin, n);
}

}  // namespace

bool has_vnni() {
  static const bool vnni = __builtin_cpu_supports("avx512vnni");
  return vnni;
}

void gemm_mxfp4_w4a4(const uint8_t* x_packed, const uint8_t* x_scales, size_t m, size_t k, const uint8_t* w_packed,
                     const uint8_t* w_scales, size_t n, float* y) {
  const long long tiles = static_cast<long long>((n + 7) / 8);
#pragma omp parallel for schedule(dynamic, 4) if (worth_threading(m, k, n))
  for (long long t = 0; t < tiles; ++t) {
    const size_t r0 = static_cast<size_t>(t) * 8;
    block_w4a4(x_packed, x_scales, m, k, w_packed, w_scales, r0, min_size(n, r0 + 8), y, n);
  }
}

}  // namespace mxlm::cpu::avx512
