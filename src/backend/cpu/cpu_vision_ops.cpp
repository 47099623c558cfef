// The CPU backend's vision encoder ops (backend.h "vision encoder"): bias, LayerNorm, exact GELU, the table
// rotary and bidirectional attention within segments.
//
// The attention is the tower's hot loop outside the linears (2 · 2 · L² · head_dim flops per head for an image
// of L patches, ~27 GFLOP per layer at the 451,584-pixel cap). Per (segment, head) K is packed transposed and V
// row-major with head_dim padded to 16 lanes; each work item takes a block of query rows, computes its full
// score rows (L ≤ a few thousand: the rows fit in L2), applies an exact-enough exp (AVX-512 polynomial, ≤ 2 ulp)
// and multiplies by V, so every score is computed once and never leaves the core. Without AVX-512 (or with the
// GEMM kernels forced to another ISA) the same schedule runs with scalar loops.
//
// GCC 12 warns inside its own avx512fintrin.h (GCC bug 105593) wherever those intrinsics are inlined.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/gemm_isa.h"
#include "core/error.h"

#define MXLM_VISION_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

namespace mxlm::backend::cpu {

namespace {

// The GEMM dispatch decides (and its test hook, gemm_force_isa, also selects the scalar schedule here).
bool use_avx512() { return mxlm::cpu::gemm_active_isa() == mxlm::cpu::GemmIsa::Avx512; }

constexpr size_t kQueryBlock = 32;  // query rows per work item (a multiple of the 4-row register tile)

size_t round16(size_t n) { return (n + 15) / 16 * 16; }

// Per-thread scratch of one work item.
struct Scratch {
  std::vector<float> q, s, o;  // [kQueryBlock, dpad], [kQueryBlock, lpad], [kQueryBlock, dpad]
};

// One (segment, head): K transposed [dpad, lpad] (zero padding), V [lpad, dpad] (zero padding).
struct PackedHead {
  const float* kt;
  const float* v;
};

// ---- scalar kernels (also the schedule without AVX-512)

void scores_scalar(const float* q, const PackedHead& h, size_t rows, size_t lpad, size_t dpad, float* s) {
  for (size_t r = 0; r < rows; ++r) {
    float* sr = s + r * lpad;
    std::fill(sr, sr + lpad, 0.0f);
    for (size_t d = 0; d < dpad; ++d) {
      const float qd = q[r * dpad + d];
      const float* kd = h.kt + d * lpad;
      for (size_t j = 0; j < lpad; ++j) sr[j] += qd * kd[j];
    }
  }
}

// exp(s - max) over the first `len` entries of each row; returns nothing, writes 1/sum per row.
void softmax_scalar(float* s, size_t rows, size_t lpad, size_t len, float* inv_sum) {
  for (size_t r = 0; r < rows; ++r) {
    float* sr = s + r * lpad;
    float mx = -INFINITY;
    for (size_t j = 0; j < len; ++j) mx = std::max(mx, sr[j]);
    double sum = 0.0;
    for (size_t j = 0; j < len; ++j) {
      sr[j] = std::exp(sr[j] - mx);
      sum += sr[j];
    }
    for (size_t j = len; j < lpad; ++j) sr[j] = 0.0f;
    inv_sum[r] = static_cast<float>(1.0 / sum);
  }
}

void pv_scalar(const float* s, const PackedHead& h, size_t rows, size_t lpad, size_t len, size_t dpad, float* o) {
  for (size_t r = 0; r < rows; ++r) {
    float* orow = o + r * dpad;
    std::fill(orow, orow + dpad, 0.0f);
    for (size_t j = 0; j < len; ++j) {
      const float p = s[r * lpad + j];
      const float* vj = h.v + j * dpad;
      for (size_t d = 0; d < dpad; ++d) orow[d] += p * vj[d];
    }
  }
}

// ---- AVX-512 kernels

// exp(x) for x ≤ 0 (softmax inputs after the max is subtracted): 2^n · p(r), r = x - n ln2 in [-ln2/2, ln2/2],
// degree-6 polynomial (Cephes expf coefficients), ≤ 2 ulp; below -87.3 the result flushes to 0.
MXLM_VISION_AVX512 inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
}

// s[4 rows, 16·NV keys at j] = q[4 rows] · K[j..]ᵀ over dpad dims.
template <int NV>
MXLM_VISION_AVX512 inline void scores_tile(const float* q, size_t dpad, const float* kt, size_t lpad, size_t j,
                                           float* s) {
  __m512 acc[4][NV];
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (size_t d = 0; d < dpad; ++d) {
    __m512 kv[NV];
    for (int v = 0; v < NV; ++v) kv[v] = _mm512_loadu_ps(kt + d * lpad + j + 16 * static_cast<size_t>(v));
    for (int r = 0; r < 4; ++r) {
      const __m512 qb = _mm512_set1_ps(q[static_cast<size_t>(r) * dpad + d]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(qb, kv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v)
      _mm512_storeu_ps(s + static_cast<size_t>(r) * lpad + j + 16 * static_cast<size_t>(v), acc[r][v]);
}

MXLM_VISION_AVX512 void scores_avx512(const float* q, const PackedHead& h, size_t rows, size_t lpad, size_t dpad,
                                      float* s) {
  for (size_t r = 0; r < rows; r += 4) {
    size_t j = 0;
    for (; j + 64 <= lpad; j += 64) scores_tile<4>(q + r * dpad, dpad, h.kt, lpad, j, s + r * lpad);
    for (; j < lpad; j += 16) scores_tile<1>(q + r * dpad, dpad, h.kt, lpad, j, s + r * lpad);
  }
}

MXLM_VISION_AVX512 void softmax_avx512(float* s, size_t rows, size_t lpad, size_t len, float* inv_sum) {
  const size_t full = len / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (len - full)) - 1u);
  for (size_t r = 0; r < rows; ++r) {
    float* sr = s + r * lpad;
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (size_t j = 0; j < full; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(sr + j));
    if (tail) mv = _mm512_mask_max_ps(mv, tail, mv, _mm512_maskz_loadu_ps(tail, sr + full));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
    __m512 sum = _mm512_setzero_ps();
    for (size_t j = 0; j < full; j += 16) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + j), mx));
      _mm512_storeu_ps(sr + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (full < lpad) {  // the tail and the padding (zero probability)
      const __m512 e = _mm512_maskz_mov_ps(tail, exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + full), mx)));
      _mm512_storeu_ps(sr + full, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv_sum[r] = 1.0f / _mm512_reduce_add_ps(sum);
  }
}

// o[4 rows, 16·NV dims at d0] = p[4 rows, 0..len) · V[0..len, d0..].
template <int NV>
MXLM_VISION_AVX512 inline void pv_tile(const float* p, size_t lpad, size_t len, const float* v, size_t dpad, size_t d0,
                                       float* o) {
  __m512 acc[4][NV];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (size_t j = 0; j < len; ++j) {
    __m512 vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_ps(v + j * dpad + d0 + 16 * static_cast<size_t>(c));
    for (int r = 0; r < 4; ++r) {
      const __m512 pb = _mm512_set1_ps(p[static_cast<size_t>(r) * lpad + j]);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < NV; ++c)
      _mm512_storeu_ps(o + static_cast<size_t>(r) * dpad + d0 + 16 * static_cast<size_t>(c), acc[r][c]);
}

MXLM_VISION_AVX512 void pv_avx512(const float* s, const PackedHead& h, size_t rows, size_t lpad, size_t len,
                                  size_t dpad, float* o) {
  for (size_t r = 0; r < rows; r += 4) {
    size_t d = 0;
    for (; d + 80 <= dpad; d += 80) pv_tile<5>(s + r * lpad, lpad, len, h.v, dpad, d, o + r * dpad);
    for (; d + 32 <= dpad; d += 32) pv_tile<2>(s + r * lpad, lpad, len, h.v, dpad, d, o + r * dpad);
    for (; d < dpad; d += 16) pv_tile<1>(s + r * lpad, lpad, len, h.v, dpad, d, o + r * dpad);
  }
}

// GELU with erf from Abramowitz & Stegun 7.1.26: erf(z) = 1 - t·P(t)·exp(-z²), t = 1 / (1 + 0.3275911 z) for
// z ≥ 0 (odd extension below), |error| ≤ 1.5e-7 absolute; for z < 0 the factor 1 + erf(z) = t·P(t)·exp(-z²) is
// formed directly, without the cancellation of 1 + erf. About 8x the throughput of std::erf per element.
MXLM_VISION_AVX512 void gelu_erf_avx512(float* x, size_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (size_t i = 0; i < n; i += 16) {
    const __mmask16 m = i + 16 <= n ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    const __m512 z = _mm512_abs_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f)));
    const __m512 t =
        _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    const __m512 tail =
        _mm512_mul_ps(_mm512_mul_ps(p, t), exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), z)));
    // 1 + erf(x/√2): 2 - tail for x ≥ 0, tail for x < 0.
    const __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 one_plus = _mm512_mask_blend_ps(neg, _mm512_sub_ps(_mm512_set1_ps(2.0f), tail), tail);
    _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), one_plus));
  }
}

}  // namespace

void CpuBackend::add_bias(float* y, const float* bias, size_t rows, size_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols > 65536)
  for (size_t r = 0; r < rows; ++r) {
    float* yr = y + r * cols;
    for (size_t c = 0; c < cols; ++c) yr[c] += bias[c];
  }
}

void CpuBackend::layer_norm(const float* x, const float* w, const float* b, float* out, size_t rows, size_t dim,
                            float eps) {
  if (dim == 0) return;
#pragma omp parallel for schedule(static) if (rows * dim > 65536)
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    double mean = 0.0;
    for (size_t i = 0; i < dim; ++i) mean += xr[i];
    mean /= static_cast<double>(dim);
    double var = 0.0;
    for (size_t i = 0; i < dim; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    var /= static_cast<double>(dim);
    const float m = static_cast<float>(mean);
    const float inv = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(eps)));
    float* o = out + r * dim;
    for (size_t i = 0; i < dim; ++i) o[i] = (xr[i] - m) * inv * w[i] + b[i];
  }
}

void CpuBackend::gelu_erf(float* x, size_t n) {
  if (use_avx512()) {
    gelu_erf_avx512(x, n);
    return;
  }
#pragma omp parallel for schedule(static) if (n > 65536)
  for (size_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * 0.70710678118654752f));
}

void CpuBackend::rope_table(float* x, const float* cos, const float* sin, size_t tokens, int heads, int head_dim,
                            int pairs) {
  if (pairs < 0 || 2 * pairs > head_dim || heads <= 0)
    fail("rope_table: {} pairs do not fit {} heads of {} dims", pairs, heads, head_dim);
  const size_t P = static_cast<size_t>(pairs), D = static_cast<size_t>(head_dim);
#pragma omp parallel for schedule(static) if (tokens > 64)
  for (size_t t = 0; t < tokens; ++t) {
    const float* c = cos + t * P;
    const float* s = sin + t * P;
    for (size_t h = 0; h < static_cast<size_t>(heads); ++h) {
      float* v = x + (t * static_cast<size_t>(heads) + h) * D;
      for (size_t k = 0; k < P; ++k) {
        const float a = v[k], b = v[k + P];
        v[k] = a * c[k] - b * s[k];
        v[k + P] = b * c[k] + a * s[k];
      }
    }
  }
}

void CpuBackend::segment_attention(const float* q, const float* k, const float* v, std::span<const int32_t> bounds,
                                   int heads, int head_dim, float scale, float* out, bool /*bf16_products: f32 here*/) {
  if (heads <= 0 || head_dim <= 0) fail("segment_attention with {} heads of {} dims", heads, head_dim);
  if (bounds.size() < 2) return;
  if (bounds[0] != 0) fail("segment_attention: the first segment starts at row {}, not 0", bounds[0]);
  for (size_t i = 1; i < bounds.size(); ++i)
    if (bounds[i] < bounds[i - 1])
      fail("segment_attention: segment bounds decrease ({} after {})", bounds[i], bounds[i - 1]);
  const bool simd = use_avx512();
  const size_t H = static_cast<size_t>(heads), D = static_cast<size_t>(head_dim), W = H * D;
  const size_t dpad = round16(D);
  for (size_t seg = 0; seg + 1 < bounds.size(); ++seg) {
    const size_t begin = static_cast<size_t>(bounds[seg]), len = static_cast<size_t>(bounds[seg + 1]) - begin;
    if (len == 0) continue;
    const size_t lpad = round16(len);
    // Pack every head's K (transposed) and V once for the segment.
    std::vector<float> packed(H * 2 * dpad * lpad, 0.0f);
    auto head_kt = [&](size_t h) { return packed.data() + h * 2 * dpad * lpad; };
    auto head_v = [&](size_t h) { return packed.data() + h * 2 * dpad * lpad + dpad * lpad; };
#pragma omp parallel for schedule(static)
    for (size_t h = 0; h < H; ++h) {
      float* kt = head_kt(h);
      float* vh = head_v(h);
      for (size_t j = 0; j < len; ++j) {
        const float* kr = k + (begin + j) * W + h * D;
        const float* vr = v + (begin + j) * W + h * D;
        for (size_t d = 0; d < D; ++d) kt[d * lpad + j] = kr[d];
        std::memcpy(vh + j * dpad, vr, D * sizeof(float));
      }
    }
    const size_t blocks = (len + kQueryBlock - 1) / kQueryBlock;
#pragma omp parallel
    {
      Scratch sc;
      sc.q.assign(kQueryBlock * dpad, 0.0f);
      sc.s.assign(kQueryBlock * lpad, 0.0f);
      sc.o.assign(kQueryBlock * dpad, 0.0f);
      float inv_sum[kQueryBlock];
#pragma omp for schedule(dynamic, 1)
      for (size_t item = 0; item < H * blocks; ++item) {
        const size_t h = item / blocks, r0 = (item % blocks) * kQueryBlock;
        const size_t rows = std::min(kQueryBlock, len - r0);
        const size_t rows4 = (rows + 3) / 4 * 4;  // register tiles of 4 rows; padding rows are zero queries
        std::fill(sc.q.begin(), sc.q.end(), 0.0f);
        for (size_t r = 0; r < rows; ++r) {
          const float* qr = q + (begin + r0 + r) * W + h * D;
          for (size_t d = 0; d < D; ++d) sc.q[r * dpad + d] = qr[d] * scale;
        }
        const PackedHead ph{head_kt(h), head_v(h)};
        if (simd) {
          scores_avx512(sc.q.data(), ph, rows4, lpad, dpad, sc.s.data());
          softmax_avx512(sc.s.data(), rows4, lpad, len, inv_sum);
          pv_avx512(sc.s.data(), ph, rows4, lpad, len, dpad, sc.o.data());
        } else {
          scores_scalar(sc.q.data(), ph, rows4, lpad, dpad, sc.s.data());
          softmax_scalar(sc.s.data(), rows4, lpad, len, inv_sum);
          pv_scalar(sc.s.data(), ph, rows4, lpad, len, dpad, sc.o.data());
        }
        for (size_t r = 0; r < rows; ++r) {
          float* orow = out + (begin + r0 + r) * W + h * D;
          for (size_t d = 0; d < D; ++d) orow[d] = sc.o[r * dpad + d] * inv_sum[r];
        }
      }
    }
  }
}

}  // namespace mxlm::backend::cpu
