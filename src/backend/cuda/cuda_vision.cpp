// The CUDA backend's vision encoder ops (backend.h "vision encoder"). Elementwise ops and LayerNorm are the
// kernels of cuda_vision.cu. Segment attention is two cuBLAS strided-batched SGEMMs per segment (all heads in
// one call: S = scale · Q Kᵀ, then O = softmax(S) V) with the row-softmax kernel between them; f32 throughout
// (the backend's cuBLAS handle runs without TF32), so it matches the CPU backend to f32 summation-order rounding.
// With bf16_products the operands are bf16 on tensor cores (f32 accumulation and softmax, bf16 probabilities):
// for head_dim 64 / 80 / 128 one fused flash-style kernel per segment (cuda_vision.cu: the scores stay in
// registers), for other sizes the two batched GEMMs with bf16 operands around the softmax.
// Scores of a whole image at the default cap (16 heads x 2304² floats, 340 MB) fit at once; larger segments are
// processed in tiles of query rows so the score buffer stays under kScoreBytes.
#include "backend/cuda/cuda_backend_impl.h"

namespace mxlm::backend::cuda {

namespace {
constexpr size_t kScoreBytes = size_t{1} << 30;
}

void CudaBackend::add_bias(float* y, const float* bias, size_t rows, size_t cols) {
  MXLM_CUDA_CHECK(launch_add_bias(y, bias, rows, cols, stream_));
}

void CudaBackend::layer_norm(const float* x, const float* w, const float* b, float* out, size_t rows, size_t dim,
                             float eps) {
  MXLM_CUDA_CHECK(launch_layer_norm(x, w, b, out, rows, dim, eps, stream_));
}

void CudaBackend::gelu_erf(float* x, size_t n) { MXLM_CUDA_CHECK(launch_gelu_erf(x, n, stream_)); }

void CudaBackend::rope_table(float* x, const float* cos, const float* sin, size_t tokens, int heads, int head_dim,
                             int pairs) {
  if (pairs < 0 || 2 * pairs > head_dim || heads <= 0)
    fail("rope_table: {} pairs do not fit {} heads of {} dims", pairs, heads, head_dim);
  MXLM_CUDA_CHECK(launch_rope_table(x, cos, sin, tokens, heads, head_dim, pairs, stream_));
}

void CudaBackend::segment_attention(const float* q, const float* k, const float* v, std::span<const int32_t> bounds,
                                    int heads, int head_dim, float scale, float* out, bool bf16_products) {
  if (heads <= 0 || head_dim <= 0) fail("segment_attention with {} heads of {} dims", heads, head_dim);
  if (bounds.size() < 2) return;
  if (bounds[0] != 0) fail("segment_attention: the first segment starts at row {}, not 0", bounds[0]);
  for (size_t i = 1; i < bounds.size(); ++i)
    if (bounds[i] < bounds[i - 1])
      fail("segment_attention: segment bounds decrease ({} after {})", bounds[i], bounds[i - 1]);
  const int W = heads * head_dim;
  const size_t n = static_cast<size_t>(bounds.back()) * static_cast<size_t>(W);
  const float one = 1.0f, zero = 0.0f;
  // bf16 products: q, k, v rounded once for all rows; the probabilities are written as bf16 by the softmax.
  Block qb, kb, vb;
  if (bf16_products) {
    qb = Block(pool_, n * 2);
    kb = Block(pool_, n * 2);
    vb = Block(pool_, n * 2);
    MXLM_CUDA_CHECK(launch_f32_to_bf16(q, qb.as<uint16_t>(), n, stream_));
    MXLM_CUDA_CHECK(launch_f32_to_bf16(k, kb.as<uint16_t>(), n, stream_));
    MXLM_CUDA_CHECK(launch_f32_to_bf16(v, vb.as<uint16_t>(), n, stream_));
  }
  const bool fused = bf16_products && flash_segment_supported(head_dim);
  for (size_t seg = 0; seg + 1 < bounds.size(); ++seg) {
    const size_t begin = static_cast<size_t>(bounds[seg]);
    const int len = bounds[seg + 1] - bounds[seg];
    if (len == 0) continue;
    if (fused) {
      MXLM_CUDA_CHECK(launch_flash_segment(qb.as<uint16_t>(), kb.as<uint16_t>(), vb.as<uint16_t>(), heads, head_dim,
                                           bounds[seg], len, scale, out, stream_));
      continue;
    }
    const size_t per_row = static_cast<size_t>(heads) * static_cast<size_t>(len) * sizeof(float);
    const int tile = static_cast<int>(std::clamp<size_t>(kScoreBytes / per_row, 1, static_cast<size_t>(len)));
    Block scores(pool_, per_row * static_cast<size_t>(tile));
    Block probs;  // bf16 probabilities
    if (bf16_products) probs = Block(pool_, per_row / 2 * static_cast<size_t>(tile));
    float* s = scores.as<float>();
    const size_t first = begin * static_cast<size_t>(W);
    for (int r0 = 0; r0 < len; r0 += tile) {
      const int rows = std::min(tile, len - r0);
      const long long stride_s = static_cast<long long>(rows) * len;
      const size_t qoff = (begin + static_cast<size_t>(r0)) * static_cast<size_t>(W);
      // Column-major view: S_hᵀ [len, rows] = K_h [len, D] · Q_hᵀ [D, rows]; head h starts head_dim values on.
      if (bf16_products) {
        check(cublasGemmStridedBatchedEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, len, rows, head_dim, &scale,
                                         kb.as<uint16_t>() + first, CUDA_R_16BF, W, head_dim, qb.as<uint16_t>() + qoff,
                                         CUDA_R_16BF, W, head_dim, &zero, s, CUDA_R_32F, len, stride_s, heads,
                                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
              "cublasGemmStridedBatchedEx(scores, bf16)");
        MXLM_CUDA_CHECK(launch_softmax_rows_bf16(s, probs.as<uint16_t>(),
                                                 static_cast<size_t>(heads) * static_cast<size_t>(rows),
                                                 static_cast<size_t>(len), stream_));
        check(cublasGemmStridedBatchedEx(cublas_, CUBLAS_OP_N, CUBLAS_OP_N, head_dim, rows, len, &one,
                                         vb.as<uint16_t>() + first, CUDA_R_16BF, W, head_dim, probs.as<uint16_t>(),
                                         CUDA_R_16BF, len, stride_s, &zero, out + qoff, CUDA_R_32F, W, head_dim, heads,
                                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
              "cublasGemmStridedBatchedEx(values, bf16)");
        continue;
      }
      check(cublasSgemmStridedBatched(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, len, rows, head_dim, &scale, k + first, W,
                                      head_dim, q + qoff, W, head_dim, &zero, s, len, stride_s, heads),
            "cublasSgemmStridedBatched(scores)");
      MXLM_CUDA_CHECK(launch_softmax_rows(s, static_cast<size_t>(heads) * static_cast<size_t>(rows),
                                          static_cast<size_t>(len), stream_));
      // O_hᵀ [D, rows] = V_hᵀ [D, len] · P_hᵀ [len, rows], written into out's head columns.
      check(cublasSgemmStridedBatched(cublas_, CUBLAS_OP_N, CUBLAS_OP_N, head_dim, rows, len, &one, v + first, W,
                                      head_dim, s, len, stride_s, &zero, out + qoff, W, head_dim, heads),
            "cublasSgemmStridedBatched(values)");
    }
  }
}

}  // namespace mxlm::backend::cuda
