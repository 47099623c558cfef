// AVX-512 MXFP4 GEMM: y = x . W^T with W in MXFP4 (packed E2M1 codes + E8M0 block scales), x in f32.
//
// Why this shape. At M = 1 the GEMV streams 17/32 byte per weight, so the decode must cost well under a
// cycle per 32 weights per core to keep up with DRAM on 2 cores; the older kernel (zero-extend 16 bytes,
// two vpermps, a scaled table per block, two FMAs) ran at ~half the read bandwidth. Here one 64-byte load
// holds the codes of 128 weights (a "group", 4 blocks). Table lookups only look at the low bits of each
// lane, so the codes never need unpacking: shifting the loaded vector right by 4t puts the t-th nibble of
// every lane in its low bits, and the lookup picks it. x is permuted once per call into the order that
// this produces, so nothing is re-interleaved per weight. Each lane of a group then holds weights of one
// block (lanes 4b..4b+3: block b), and the block scales are applied per lane to the group's partial sum.
// Tiles of NR = 4 weight rows share the x loads; at each group a tile prefetches the same offset NR rows on,
// i.e. the next tile, so DRAM reads stay in flight while it computes (4 interleaved rows are more streams than
// the hardware prefetcher runs far enough ahead on; single-core streaming went from ~15 to ~25 GB/s of
// weights per CPU second with it, a plain read loop ~28; bench/RESULTS.md).
//
// Three per-row modes of x, chosen from the row's own values (so a row's result never depends on the
// other rows of x, the batch, or the thread count):
// - Bf16: every x is exactly a bf16 value with 2^-100 <= |x| < 2^100 or zero. This is the emulation path:
//   activations quantize-dequantized to MXFP4 are such values. Codes become bf16 E2M1 values with one
//   vpermw per 32 weights and vdpbf16ps multiplies them with x. Every product x * e is exact in f32 (8-bit x
//   8-bit significands), and the range condition keeps every product and partial sum a normal number, so
//   the instruction's denormal flushing never applies; the group sum times the power-of-two block scale is
//   exact unless it underflows. So each output is a sum of the exact products x * (e * scale) in some order:
//   the same result class as the reference, within f32 summation-order rounding.
// - F32: any other x with |x| < 2^100. E2M1 values as f32 (vpermps, 16 per lookup), partial sums of the
//   exact products x * e by FMA, then the group sum times the scale (exact as above). A group sum never
//   overflows: 8 products of at most 6 * 2^100 per lane.
// - F32Scaled: rows with |x| >= 2^100, Inf or NaN: the weights are scaled before the FMA, so every product
//   is the reference product x * (e * scale) and over- and underflow happen exactly where the reference has
//   them.
// Summation: per output, 16 lane sums over K (per group: the products in t order, then added to the lane
// sum), then one fixed tree. The K tail (K % 128 != 0) is a masked load with zero codes and zero x.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstring>
#include <vector>

#include "backend/cpu/gemm_kernels.h"

#define MXLM_AVX512_MX __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define MXLM_AVX512_MX_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

namespace mxlm::cpu::avx512 {
namespace {

constexpr size_t kGroup = 128;  // weights per 64-byte load of codes
enum class Mode { Bf16, F32, F32Scaled };

inline size_t padded(size_t k) { return (k + kGroup - 1) / kGroup * kGroup; }

bool has_bf16() {
  static const bool bf16 = __builtin_cpu_supports("avx512bf16");
  return bf16;
}

Mode classify(const float* x, size_t k) {
  bool bf16 = true, in_range = true;
  for (size_t i = 0; i < k; ++i) {
    const uint32_t bits = std::bit_cast<uint32_t>(x[i]);
    const uint32_t exponent = (bits >> 23) & 0xff;  // |x| in [2^(e-127), 2^(e-126))
    in_range &= exponent <= 226;                    // |x| < 2^100, finite
    bf16 &= (bits & 0xffff) == 0 && ((bits & 0x7fffffff) == 0 || exponent >= 27);
  }
  if (!in_range) return Mode::F32Scaled;
  return bf16 && has_bf16() ? Mode::Bf16 : Mode::F32;
}

// f32 order: vector t of group g, lane j holds x[g + 8j + t] (the t-th nibble of the lane's 4 bytes).
void permute_f32(const float* x, size_t k, float* out) {
  const size_t kp = padded(k);
  for (size_t g = 0; g < kp; g += kGroup)
    for (size_t t = 0; t < 8; ++t)
      for (size_t j = 0; j < 16; ++j) {
        const size_t src = g + 8 * j + t;
        out[g + 16 * t + j] = src < k ? x[src] : 0.0f;
      }
}

// bf16 order: vector t of group g, 16-bit lane w holds x[g + 4w + t] (the t-th nibble of the lane's 2 bytes);
// vdpbf16ps pairs lanes 2j and 2j + 1, weights 8j + t and 8j + 4 + t: both in block j / 4.
void permute_bf16(const float* x, size_t k, uint16_t* out) {
  const size_t kp = padded(k);
  for (size_t g = 0; g < kp; g += kGroup)
    for (size_t t = 0; t < 4; ++t)
      for (size_t w = 0; w < 32; ++w) {
        const size_t src = g + 4 * w + t;
        out[g + 32 * t + w] = src < k ? static_cast<uint16_t>(std::bit_cast<uint32_t>(x[src]) >> 16) : 0;
      }
}

// E2M1 codes as bf16 bits, twice (vpermw indexes 32 lanes; bit 4 of the index is the next code's low bit).
constexpr std::array<uint16_t, 32> kE2m1Bf16 = [] {
  std::array<uint16_t, 32> table{};
  for (size_t i = 0; i < 32; ++i) table[i] = static_cast<uint16_t>(std::bit_cast<uint32_t>(kE2m1Values[i % 16]) >> 16);
  return table;
}();

// Whether any of `count` scale bytes is 0 (the subnormal 2^-127) or 255 (NaN): the two bytes that are not
// a plain f32 exponent field. Checked once per tile of weight rows, so the group loop has no such branch.
MXLM_AVX512_MX bool has_special_scales(const uint8_t* scales, size_t count) {
  __mmask64 special = 0;
  for (size_t i = 0; i < count; i += 64) {
    const size_t left = count - i;
    const __mmask64 valid = left >= 64 ? ~__mmask64{0} : ~__mmask64{0} >> (64 - left);
    const __m512i bytes = _mm512_maskz_loadu_epi8(valid, scales + i);
    special |= _mm512_mask_cmpeq_epi8_mask(valid, bytes, _mm512_setzero_si512()) |
               _mm512_mask_cmpeq_epi8_mask(valid, bytes, _mm512_set1_epi8(-1));
  }
  return special != 0;
}

// Lane j: the scale of block j / 4 of the group, 2^(byte - 127), for `blocks` (1-4) blocks; missing blocks of
// a K tail read as scale 1 (their codes and x are zero). kSpecial: bytes 0 and 255 may occur (table lookups);
// otherwise each byte goes straight into the exponent field.
template <bool kSpecial>
MXLM_AVX512_MX inline __m512 group_scales(const uint8_t* scales, size_t blocks) {
  uint32_t word = 0x7f7f7f7fu;
  if (blocks == 4) {
    std::memcpy(&word, scales, 4);
  } else {
    for (size_t b = 0; b < blocks; ++b) word = (word & ~(0xffu << (8 * b))) | (uint32_t{scales[b]} << (8 * b));
  }
  if constexpr (kSpecial) {
    const __m512 four = _mm512_castps128_ps512(_mm_setr_ps(kE8m0Values[word & 0xff], kE8m0Values[(word >> 8) & 0xff],
                                                           kE8m0Values[(word >> 16) & 0xff], kE8m0Values[word >> 24]));
    return _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0), four);
  } else {
    // Byte b of the word to the low byte of lanes 4b..4b+3 (zeros elsewhere), then into the exponent field.
    constexpr int b0 = static_cast<int>(0x80808000u), b1 = b0 + 1, b2 = b0 + 2, b3 = b0 + 3;  // 0x80: zero byte
    const __m512i pick = _mm512_set_epi32(b3, b3, b3, b3, b2, b2, b2, b2, b1, b1, b1, b1, b0, b0, b0, b0);
    const __m512i bytes = _mm512_shuffle_epi8(_mm512_set1_epi32(static_cast<int>(word)), pick);
    return _mm512_castsi512_ps(_mm512_slli_epi32(bytes, 23));
  }
}

// The code bytes of group g of a row: a plain 64-byte load for a full group (masked byte loads measured
// much slower on the dev VM's Zen 5), a masked one for the `blocks` blocks of a K tail.
template <bool kTail>
MXLM_AVX512_MX inline __m512i group_codes(const uint8_t* codes, size_t blocks) {
  if constexpr (kTail) {
    return _mm512_maskz_loadu_epi8(~__mmask64{0} >> (64 - 16 * blocks), codes);
  } else {
    return _mm512_loadu_si512(codes);
  }
}

struct Tile {
  const void* x;          // permuted rows of x (float or bf16 bits), row stride padded(k)
  float* const* y;        // output rows
  const uint8_t* packed;  // [n, k/2]
  const uint8_t* scales;  // [n, k/32]
  size_t k;
};

// Where a tile of weight rows is.
struct TileRows {
  const uint8_t* packed;  // codes of the tile's first weight row
  const uint8_t* scales;  // scales of the tile's first weight row
  size_t row_bytes, blocks, kp;
};

#define MXLM_INLINE inline __attribute__((always_inline))

// One group (128 weights) of MR rows of f32 x against NR weight rows: the NR rows' codes stay in registers
// while each nibble position t is looked up once and multiplied with the MR rows of x.
template <bool kScaleWeights, bool kSpecial, bool kTail, int MR, int NR>
MXLM_AVX512_MX MXLM_INLINE void group_f32(const TileRows& s, const float* x, size_t g, __m512 table,
                                          __m512 (&acc)[MR][NR]) {
  const size_t blocks = kTail ? s.blocks - g / 32 : 4;
  __m512i bytes[NR];
  __m512 scale[NR], part[MR][NR];
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) {
    const uint8_t* codes = s.packed + j * s.row_bytes + g / 2;
    _mm_prefetch(reinterpret_cast<const char*>(codes + NR * s.row_bytes), _MM_HINT_T0);  // the next tile's
    bytes[j] = group_codes<kTail>(codes, blocks);
    if constexpr (kScaleWeights) scale[j] = group_scales<kSpecial>(s.scales + j * s.blocks + g / 32, blocks);
  }
#pragma GCC unroll 8
  for (int t = 0; t < 8; ++t) {
    __m512 xv[MR];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_ps(x + i * s.kp + g + 16 * t);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      __m512 w = _mm512_permutexvar_ps(t == 0 ? bytes[j] : _mm512_srli_epi32(bytes[j], 4 * t), table);
      if constexpr (kScaleWeights) w = _mm512_mul_ps(w, scale[j]);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        if constexpr (kScaleWeights) {
          acc[i][j] = _mm512_fmadd_ps(xv[i], w, acc[i][j]);
        } else {
          part[i][j] = t == 0 ? _mm512_mul_ps(xv[i], w) : _mm512_fmadd_ps(xv[i], w, part[i][j]);
        }
      }
    }
  }
  if constexpr (!kScaleWeights) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const __m512 scale_j = group_scales<kSpecial>(s.scales + j * s.blocks + g / 32, blocks);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(part[i][j], scale_j, acc[i][j]);
    }
  }
}

// The same with bf16 x (mode Bf16): 4 nibble positions of 32 codes each.
template <bool kSpecial, bool kTail, int MR, int NR>
MXLM_AVX512_MX_BF16 MXLM_INLINE void group_bf16(const TileRows& s, const uint16_t* x, size_t g, __m512i table,
                                                __m512 (&acc)[MR][NR]) {
  const size_t blocks = kTail ? s.blocks - g / 32 : 4;
  __m512i bytes[NR];
  __m512 part[MR][NR];
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) {
    const uint8_t* codes = s.packed + j * s.row_bytes + g / 2;
    _mm_prefetch(reinterpret_cast<const char*>(codes + NR * s.row_bytes), _MM_HINT_T0);  // the next tile's
    bytes[j] = group_codes<kTail>(codes, blocks);
  }
#pragma GCC unroll 4
  for (int t = 0; t < 4; ++t) {
    __m512bh xv[MR];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) xv[i] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + i * s.kp + g + 32 * t));
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const __m512bh w = reinterpret_cast<__m512bh>(
          _mm512_permutexvar_epi16(t == 0 ? bytes[j] : _mm512_srli_epi16(bytes[j], 4 * t), table));
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) part[i][j] = _mm512_dpbf16_ps(t == 0 ? _mm512_setzero_ps() : part[i][j], xv[i], w);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) {
    const __m512 scale = group_scales<kSpecial>(s.scales + j * s.blocks + g / 32, blocks);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(part[i][j], scale, acc[i][j]);
  }
}

// y[i][r0 + j] for MR rows of x against NR weight rows from r0: the full groups, then the K tail.
template <Mode kMode, bool kSpecial, int MR, int NR>
MXLM_AVX512_MX_BF16 void tile_groups(const Tile& a, size_t r0) {
  const size_t row_bytes = a.k / 2, blocks = a.k / 32;
  const TileRows s{a.packed + r0 * row_bytes, a.scales + r0 * blocks, row_bytes, blocks, padded(a.k)};
  __m512 acc[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  size_t g = 0;
  if constexpr (kMode == Mode::Bf16) {
    const __m512i table = _mm512_loadu_si512(kE2m1Bf16.data());
    const uint16_t* x = static_cast<const uint16_t*>(a.x);
    for (; g + kGroup <= a.k; g += kGroup) group_bf16<kSpecial, false>(s, x, g, table, acc);
    if (g < a.k) group_bf16<kSpecial, true>(s, x, g, table, acc);
  } else {
    constexpr bool kScaleWeights = kMode == Mode::F32Scaled;
    const __m512 table = _mm512_loadu_ps(kE2m1Values);
    const float* x = static_cast<const float*>(a.x);
    for (; g + kGroup <= a.k; g += kGroup) group_f32<kScaleWeights, kSpecial, false>(s, x, g, table, acc);
    if (g < a.k) group_f32<kScaleWeights, kSpecial, true>(s, x, g, table, acc);
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) a.y[i][r0 + j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <Mode kMode, int MR, int NR>
void tile(const Tile& a, size_t r0) {
  const size_t blocks = a.k / 32;
  if (has_special_scales(a.scales + r0 * blocks, NR * blocks)) {
    tile_groups<kMode, true, MR, NR>(a, r0);
  } else {
    tile_groups<kMode, false, MR, NR>(a, r0);
  }
}

// Weight rows [r_begin, r_end) against MR rows of x.
template <Mode kMode, int MR>
void rows_for_mr(const Tile& a, size_t r_begin, size_t r_end) {
  constexpr int NR = 4;
  size_t r = r_begin;
  for (; r + NR <= r_end; r += NR) tile<kMode, MR, NR>(a, r);
  for (; r < r_end; ++r) tile<kMode, MR, 1>(a, r);
}

// All rows of x of one mode (permuted, `m` of them) against weight rows [r_begin, r_end).
template <Mode kMode>
void rows(Tile a, size_t m, size_t r_begin, size_t r_end) {
  // Two rows of x at a time: with 4 (and 2 weight rows, for registers) the f32 path measured ~half as fast.
  const size_t stride = padded(a.k) * (kMode == Mode::Bf16 ? sizeof(uint16_t) : sizeof(float));
  const char* x = static_cast<const char*>(a.x);
  size_t i = 0;
  for (; i + 2 <= m; i += 2, a.y += 2, a.x = x + i * stride) rows_for_mr<kMode, 2>(a, r_begin, r_end);
  if (i < m) rows_for_mr<kMode, 1>(a, r_begin, r_end);
}

}  // namespace

void gemm_mxfp4(const float* x, size_t m, size_t k, const uint8_t* w_packed, const uint8_t* w_scales, size_t n,
                float* y) {
  // Rows of x by mode, each mode's rows permuted into its kernel's order.
  constexpr int kModes = 3;
  static thread_local std::vector<float> x_f32[2];
  static thread_local std::vector<uint16_t> x_bf16;
  static thread_local std::vector<float*> y_rows[kModes];
  static thread_local std::vector<Mode> modes;
  const size_t kp = padded(k);
  for (auto& rows : y_rows) rows.clear();
  modes.resize(m);
  for (size_t i = 0; i < m; ++i) {
    modes[i] = classify(x + i * k, k);
    y_rows[static_cast<int>(modes[i])].push_back(y + i * n);
  }
  x_bf16.resize(y_rows[0].size() * kp);
  for (int f = 0; f < 2; ++f) x_f32[f].resize(y_rows[1 + f].size() * kp);
  size_t next[kModes] = {};
  for (size_t i = 0; i < m; ++i) {
    const int mode = static_cast<int>(modes[i]);
    const size_t slot = next[mode]++;
    if (mode == 0) {
      permute_bf16(x + i * k, k, x_bf16.data() + slot * kp);
    } else {
      permute_f32(x + i * k, k, x_f32[mode - 1].data() + slot * kp);
    }
  }
  const Tile tiles[kModes] = {{x_bf16.data(), y_rows[0].data(), w_packed, w_scales, k},
                              {x_f32[0].data(), y_rows[1].data(), w_packed, w_scales, k},
                              {x_f32[1].data(), y_rows[2].data(), w_packed, w_scales, k}};
  const size_t count[kModes] = {y_rows[0].size(), y_rows[1].size(), y_rows[2].size()};
  const auto run = [&](size_t r0, size_t r1) {
    if (count[0]) rows<Mode::Bf16>(tiles[0], count[0], r0, r1);
    if (count[1]) rows<Mode::F32>(tiles[1], count[1], r0, r1);
    if (count[2]) rows<Mode::F32Scaled>(tiles[2], count[2], r0, r1);
  };
  if (m * k * n < (size_t{1} << 18) || omp_get_max_threads() == 1) return run(0, n);
  // Threads claim runs of 8-row tiles, big ones first (a quarter of what is left per thread), shrinking to 4
  // tiles at the end, so each thread streams long contiguous runs of W (each tile prefetches the next one: with
  // OpenMP's dynamic chunks of 4 tiles the threads alternated chunks, every chunk's last tile prefetched rows of
  // the other thread and M = 1 ran 10-25 % slower), while a core busy with something else still does not hold
  // up the call. When the main thread runs out of tiles while the other threads work on their last ones, it
  // spins for them instead of sleeping in OpenMP's barrier: under OMP_WAIT_POLICY=passive, waking a thread of
  // an idle vCPU took ~26 us on the dev VM, a tenth of a 10 MB GEMV, while their last tiles take a few us
  // (bench/RESULTS.md). The spin is bounded, so a descheduled worker only makes it fall back to the barrier; a
  // worker that has not started yet (woken late) is waited for in the barrier as before.
  const size_t tiles_total = (n + 7) / 8;
  std::atomic<size_t> next_tile{0};
  std::atomic<int> started{0}, finished{0};
#pragma omp parallel
  {
    const size_t threads = static_cast<size_t>(omp_get_num_threads());
    const bool main_thread = omp_get_thread_num() == 0;
    if (!main_thread) started.fetch_add(1, std::memory_order_relaxed);
    for (;;) {
      size_t claim = next_tile.load(std::memory_order_relaxed), take = 0;
      do {
        if (claim >= tiles_total) break;
        take = std::max<size_t>(4, (tiles_total - claim) / (4 * threads));
      } while (!next_tile.compare_exchange_weak(claim, claim + take, std::memory_order_relaxed));
      if (claim >= tiles_total) break;
      run(claim * 8, std::min(n, (claim + take) * 8));
    }
    if (!main_thread) {
      finished.fetch_add(1, std::memory_order_release);
    } else {
      const int others = static_cast<int>(threads) - 1;
      const auto others_working = [&] {
        return started.load(std::memory_order_relaxed) == others && finished.load(std::memory_order_acquire) < others;
      };
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
      for (int spin = 1; others_working(); ++spin) {
        _mm_pause();
        if (spin % 64 == 0 && std::chrono::steady_clock::now() > deadline) break;
      }
    }
  }
}

}  // namespace mxlm::cpu::avx512
