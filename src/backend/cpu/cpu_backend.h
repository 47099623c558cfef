// The CPU implementation of backend::Backend: host memory, f32 activations, OpenMP across cores. Matrix
// products go to the dispatched kernels of gemm.h; everything else is here and in cpu_attention.cpp /
// cpu_moe.cpp.
#pragma once

#include <memory>
#include <vector>

#include "backend/backend.h"

namespace mxlm::backend::cpu {

class HostBuffer final : public Buffer {
 public:
  explicit HostBuffer(size_t count) : data_(count, 0.0f) {}
  float* f32() override { return data_.data(); }
  int32_t* i32() override { return reinterpret_cast<int32_t*>(data_.data()); }
  size_t size() const override { return data_.size(); }

 private:
  std::vector<float> data_;
};

class HostWeight final : public Weight {
 public:
  explicit HostWeight(const WeightData& d);
  WeightFormat format() const override { return format_; }
  int64_t rows() const override { return rows_; }
  int64_t cols() const override { return cols_; }
  const uint8_t* bytes() const { return data_.data(); }
  const uint8_t* scales() const { return scales_.data(); }
  // Row r as f32 (any format).
  void row_f32(int64_t r, float* out) const;

 private:
  WeightFormat format_;
  int64_t rows_;
  int64_t cols_;
  std::vector<uint8_t> data_;
  std::vector<uint8_t> scales_;
};

class CpuTpGroup;

class CpuBackend final : public Backend {
 public:
  CpuBackend() = default;
  // Rank `rank` of a CPU tensor-parallel group (cpu_tp_group.h).
  CpuBackend(std::shared_ptr<CpuTpGroup> group, int rank) : group_(std::move(group)), rank_(rank) {}
  std::string name() const override { return "cpu"; }

  std::unique_ptr<Buffer> alloc(size_t count) override;
  void upload(Buffer& dst, size_t offset, const float* src, size_t count) override;
  void download(const Buffer& src, size_t offset, float* dst, size_t count) override;
  void copy(const float* src, float* dst, size_t count) override;
  std::unique_ptr<Weight> upload_weight(const WeightData& data) override;
  std::unique_ptr<Buffer> upload_vector(std::span<const float> values) override;

  void add(const float* a, const float* b, float* out, size_t n) override;
  void scale(float* x, float factor, size_t n) override;
  void rms_norm(const float* x, const float* w, float* out, size_t rows, size_t dim, float eps, bool add_one) override;
  void rope(float* x, std::span<const int32_t> positions, int heads, int head_dim, int rotary_dim,
            float theta) override;
  void swiglu_oai(const float* gate, const float* up, float* out, size_t n, SwigluParams p) override;
  void qdq_mxfp4(float* x, size_t rows, size_t k) override;

  void linear(const float* x, size_t m, const Weight& w, float* y) override;
  void embedding(const Weight& table, std::span<const int32_t> ids, int64_t row_offset, float* out) override;

  void router(const float* x, size_t tokens, const Weight& w, const float* bias, int k, float scale, int32_t* ids,
              float* weights) override;
  void moe_experts(const float* x, size_t tokens, const int32_t* ids, const float* weights, int k,
                   std::span<const Weight* const> gate, std::span<const Weight* const> up,
                   std::span<const Weight* const> down, int first_expert, SwigluParams p, bool qdq_inputs,
                   const SharedExpert* shared, float* out) override;

  void cache_write(const float* x, size_t width, std::span<const int64_t> slots, float* cache) override;
  void attention(const float* q, const AttentionBatch& batch, const AttentionShape& shape, const float* k_cache,
                 const float* v_cache, float* out) override;
  void index_select(const float* iq, const AttentionBatch& batch, const IndexerShape& shape, const float* index_k_cache,
                    int32_t* blocks) override;
  void sparse_attention(const float* q, const AttentionBatch& batch, const AttentionShape& shape, const float* k_cache,
                        const float* v_cache, const int32_t* blocks, int topk, float* out) override;

  // Vision encoder ops (cpu_vision_ops.cpp).
  void add_bias(float* y, const float* bias, size_t rows, size_t cols) override;
  void layer_norm(const float* x, const float* w, const float* b, float* out, size_t rows, size_t dim,
                  float eps) override;
  void gelu_erf(float* x, size_t n) override;
  void rope_table(float* x, const float* cos, const float* sin, size_t tokens, int heads, int head_dim,
                  int pairs) override;
  void segment_attention(const float* q, const float* k, const float* v, std::span<const int32_t> bounds, int heads,
                         int head_dim, float scale, float* out, bool bf16_products = false) override;

  int tp_rank() const override { return rank_; }
  int tp_size() const override;
  void all_reduce_sum(float* x, size_t n) override;
  void all_gather_cols(const float* x, size_t rows, size_t cols_per_rank, float* out) override;
  void abort_collectives(const std::string& reason) override;

 private:
  std::shared_ptr<CpuTpGroup> group_;
  int rank_ = 0;
};

const HostWeight& host(const Weight& w);

}  // namespace mxlm::backend::cpu
