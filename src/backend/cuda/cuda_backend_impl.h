// The CUDA backend's classes, shared by the files that implement its ops (cuda_backend.cpp: memory, elementwise,
// linear, attention; cuda_moe.cpp: the routed experts; other cuda_*.cpp files add op groups the same way: declare
// the member here, define it in its own file). Only src/backend/cuda includes this header.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_kernels.h"
#include "core/error.h"
#include "mx/mxfp4.h"

namespace mxlm::backend::cuda {

inline bool bf16_gemv_enabled() {
  const char* v = std::getenv("MXLM_CUDA_BF16_GEMV");
  return v == nullptr || v[0] != '0';
}

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail("CUDA error in {}: {}", what, cudaGetErrorString(e));
}

inline void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) fail("cuBLAS error {} in {}", static_cast<int>(s), what);
}

// The failing call and where it is (a captured decode step that fails names the op that broke the capture).
#define MXLM_CUDA_STR2(x) #x
#define MXLM_CUDA_STR(x) MXLM_CUDA_STR2(x)
#define MXLM_CUDA_CHECK(expr) check((expr), #expr " at " __FILE_NAME__ ":" MXLM_CUDA_STR(__LINE__))

// Caching device allocator: freed blocks go back to a per-size free list instead of cudaFree, so the model's
// per-step scratch buffers cost no driver calls after the first step. Sizes are rounded (powers of two up to
// 16 MiB, then multiples of 16 MiB) so that buffers of similar size share lists. All work runs on one stream,
// so a block reused by a later op is stream-ordered after the ops that used it before.
class Pool {
 public:
  Pool() = default;
  // A pool whose cached blocks captured graphs refer to: it never frees them; when the driver is out of memory it
  // frees `spill`'s cached blocks instead.
  explicit Pool(std::shared_ptr<Pool> spill) : spill_(std::move(spill)) {}
  ~Pool() {
    for (auto& [bytes, list] : free_)
      for (void* p : list) cudaFree(p);
  }

  static size_t rounded(size_t bytes) {
    if (bytes <= 256) return 256;
    if (bytes <= (16u << 20)) return std::bit_ceil(bytes);
    const size_t step = 16u << 20;
    return (bytes + step - 1) / step * step;
  }

  void* get(size_t bytes) {
    const size_t b = rounded(bytes);
    {
      std::lock_guard lock(mutex_);
      auto it = free_.find(b);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        return p;
      }
    }
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, b);
    if (e != cudaSuccess) {
      // Give cached blocks back to the driver and try once more.
      (void)cudaGetLastError();
      if (spill_) {
        spill_->release_cached();
      } else {
        release_cached();
      }
      MXLM_CUDA_CHECK(cudaMalloc(&p, b));
    }
    return p;
  }

  void put(void* p, size_t bytes) {
    std::lock_guard lock(mutex_);
    free_[rounded(bytes)].push_back(p);
  }

  void release_cached() {
    std::lock_guard lock(mutex_);
    cudaDeviceSynchronize();
    for (auto& [bytes, list] : free_) {
      for (void* p : list) cudaFree(p);
      list.clear();
    }
  }

 private:
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  std::shared_ptr<Pool> spill_;
};

// A pooled device allocation, returned to the pool on destruction.
class Block {
 public:
  Block() = default;
  Block(std::shared_ptr<Pool> pool, size_t bytes) : pool_(std::move(pool)), bytes_(bytes) { ptr_ = pool_->get(bytes); }
  Block(Block&& o) noexcept : pool_(std::move(o.pool_)), ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; }
  Block& operator=(Block&& o) noexcept {
    if (this != &o) {
      reset();
      pool_ = std::move(o.pool_);
      ptr_ = o.ptr_;
      bytes_ = o.bytes_;
      o.ptr_ = nullptr;
    }
    return *this;
  }
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;
  ~Block() { reset(); }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void reset() {
    if (ptr_ && pool_) pool_->put(ptr_, bytes_);
    ptr_ = nullptr;
  }
  std::shared_ptr<Pool> pool_;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

class DeviceBuffer final : public Buffer {
 public:
  DeviceBuffer(std::shared_ptr<Pool> pool, size_t count)
      : block_(std::move(pool), std::max<size_t>(count, 1) * sizeof(float)), count_(count) {}
  float* f32() override { return block_.as<float>(); }
  int32_t* i32() override { return block_.as<int32_t>(); }
  size_t size() const override { return count_; }

 private:
  Block block_;
  size_t count_;
};

// Storage: F32 and F16 as f32, BF16 as bf16, MXFP4 as packed bytes + scale bytes (as in the checkpoint).
class DeviceWeight final : public Weight {
 public:
  DeviceWeight(WeightFormat f, int64_t rows, int64_t cols) : format_(f), rows_(rows), cols_(cols) {}
  ~DeviceWeight() override {
    if (data_) cudaFree(data_);
    if (scales_) cudaFree(scales_);
  }
  WeightFormat format() const override { return format_; }
  int64_t rows() const override { return rows_; }
  int64_t cols() const override { return cols_; }
  void* data_ = nullptr;
  uint8_t* scales_ = nullptr;

 private:
  WeightFormat format_;
  int64_t rows_, cols_;
};

inline const DeviceWeight& dev(const Weight& w) { return static_cast<const DeviceWeight&>(w); }

// A tensor-parallel group's size and the device of a rank (cuda_tp.cpp, where the group is defined).
int tp_group_size(const CudaTpGroup& group);
int tp_group_device(const CudaTpGroup& group, int rank);

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(CudaOptions o) : options_(o), pool_(std::make_shared<Pool>()) {
    graph_pool_ = std::make_shared<Pool>(pool_);
    if (o.kv_cache_dtype != DType::F32 && o.kv_cache_dtype != DType::BF16)
      fail("CUDA KV cache dtype must be F32 or BF16, not {}", dtype_name(o.kv_cache_dtype));
    MXLM_CUDA_CHECK(cudaSetDevice(o.device));
    cudaDeviceProp prop{};
    MXLM_CUDA_CHECK(cudaGetDeviceProperties(&prop, o.device));
    sms_ = prop.multiProcessorCount;
    device_name_ = prop.name;
    MXLM_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    check(cublasCreate(&cublas_), "cublasCreate");
    check(cublasSetStream(cublas_, stream_), "cublasSetStream");
    check(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
    void* ring = nullptr;
    MXLM_CUDA_CHECK(cudaHostAlloc(&ring, kRingBytes, cudaHostAllocDefault));
    ring_ = static_cast<char*>(ring);
    gemv_counters(1);  // allocated (and zeroed) now: the first user may run inside a CUDA graph capture
  }
  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    cudaFreeHost(ring_);
    cublasDestroy(cublas_);
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "cuda"; }
  cudaStream_t stream() const { return stream_; }

  // ---- memory
  std::unique_ptr<Buffer> alloc(size_t count) override {
    auto b = std::make_unique<DeviceBuffer>(pool_, count);
    MXLM_CUDA_CHECK(cudaMemsetAsync(b->f32(), 0, std::max<size_t>(count, 1) * sizeof(float), stream_));
    return b;
  }
  void upload(Buffer& dst, size_t offset, const float* src, size_t count) override {
    if (offset + count > dst.size())
      fail("upload of {} elements at {} overflows a buffer of {}", count, offset, dst.size());
    MXLM_CUDA_CHECK(cudaMemcpyAsync(dst.f32() + offset, src, count * sizeof(float), cudaMemcpyHostToDevice, stream_));
  }
  void download(const Buffer& src, size_t offset, float* dst, size_t count) override {
    if (offset + count > src.size())
      fail("download of {} elements at {} overflows a buffer of {}", count, offset, src.size());
    // A tensor-parallel rank waits for its stream before the pageable copy: a copy queued behind a collective would
    // block inside the driver until the peer ranks arrive, and can keep a peer's cudaMalloc from returning (a
    // deadlock between the rank threads).
    if (options_.tp) MXLM_CUDA_CHECK(cudaStreamSynchronize(stream_));
    MXLM_CUDA_CHECK(cudaMemcpyAsync(dst, const_cast<Buffer&>(src).f32() + offset, count * sizeof(float),
                                    cudaMemcpyDeviceToHost, stream_));
    MXLM_CUDA_CHECK(cudaStreamSynchronize(stream_));
    ring_used_ = 0;
  }
  void copy(const float* src, float* dst, size_t count) override {
    MXLM_CUDA_CHECK(cudaMemcpyAsync(dst, src, count * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
  }

  std::unique_ptr<Weight> upload_weight(const WeightData& d) override {
    if (d.rows <= 0 || d.cols <= 0) fail("weight of invalid shape [{}, {}]", d.rows, d.cols);
    const size_t n = static_cast<size_t>(d.rows) * static_cast<size_t>(d.cols);
    auto w =
        std::make_unique<DeviceWeight>(d.format == WeightFormat::F16 ? WeightFormat::F32 : d.format, d.rows, d.cols);
    switch (d.format) {
      case WeightFormat::F32:
        MXLM_CUDA_CHECK(cudaMalloc(&w->data_, n * 4));
        MXLM_CUDA_CHECK(cudaMemcpy(w->data_, d.data, n * 4, cudaMemcpyHostToDevice));
        break;
      case WeightFormat::BF16:
        MXLM_CUDA_CHECK(cudaMalloc(&w->data_, n * 2));
        MXLM_CUDA_CHECK(cudaMemcpy(w->data_, d.data, n * 2, cudaMemcpyHostToDevice));
        break;
      case WeightFormat::F16: {
        Block tmp(pool_, n * 2);
        MXLM_CUDA_CHECK(cudaMemcpy(tmp.as<void>(), d.data, n * 2, cudaMemcpyHostToDevice));
        MXLM_CUDA_CHECK(cudaMalloc(&w->data_, n * 4));
        MXLM_CUDA_CHECK(launch_f16_to_f32(tmp.as<uint16_t>(), static_cast<float*>(w->data_), n, stream_));
        MXLM_CUDA_CHECK(cudaStreamSynchronize(stream_));
        break;
      }
      case WeightFormat::MXFP4:
        if (d.cols % 32 != 0) fail("MXFP4 weight with {} columns (not a multiple of 32)", d.cols);
        MXLM_CUDA_CHECK(cudaMalloc(&w->data_, n / 2));
        MXLM_CUDA_CHECK(cudaMemcpy(w->data_, d.data, n / 2, cudaMemcpyHostToDevice));
        MXLM_CUDA_CHECK(cudaMalloc(&w->scales_, n / 32));
        MXLM_CUDA_CHECK(cudaMemcpy(w->scales_, d.scales, n / 32, cudaMemcpyHostToDevice));
        break;
    }
    return w;
  }

  std::unique_ptr<Weight> random_weight(WeightFormat format, int64_t rows, int64_t cols, uint64_t seed) override {
    return make_random_cuda_weight(format, rows, cols, seed);  // generated on the device: no host data, no upload
  }

  std::unique_ptr<Buffer> upload_vector(std::span<const float> values) override {
    auto b = std::make_unique<DeviceBuffer>(pool_, values.size());
    MXLM_CUDA_CHECK(
        cudaMemcpyAsync(b->f32(), values.data(), values.size() * sizeof(float), cudaMemcpyHostToDevice, stream_));
    return b;
  }

  // ---- elementwise
  void add(const float* a, const float* b, float* out, size_t n) override {
    MXLM_CUDA_CHECK(launch_add(a, b, out, n, stream_));
  }
  void scale(float* x, float factor, size_t n) override { MXLM_CUDA_CHECK(launch_scale(x, factor, n, stream_)); }
  void rms_norm(const float* x, const float* w, float* out, size_t rows, size_t dim, float eps, bool add_one) override {
    MXLM_CUDA_CHECK(launch_rms_norm(x, w, out, rows, dim, eps, add_one, stream_));
  }
  void rope(float* x, std::span<const int32_t> positions, int heads, int head_dim, int rotary_dim,
            float theta) override {
    check_rotary(rotary_dim, head_dim);
    if (positions.empty() || rotary_dim == 0) return;
    RopeInputs in = rope_inputs(positions, rotary_dim, theta);
    MXLM_CUDA_CHECK(launch_rope(x, in.positions, positions.size(), heads, head_dim, rotary_dim, in.inv_freq, stream_));
  }
  // One launch each (same bits as the two ops); MXLM_CUDA_FUSED_NORMS=0 runs the two ops (benchmark baseline).
  void add_rms_norm(float* h, const float* y, const float* w, float* out, size_t rows, size_t dim, float eps,
                    bool add_one) override {
    if (!fused_norms()) return Backend::add_rms_norm(h, y, w, out, rows, dim, eps, add_one);
    MXLM_CUDA_CHECK(launch_add_rms_norm(h, y, w, out, rows, dim, eps, add_one, stream_));
  }
  void rms_norm_rope(float* x, const float* w, std::span<const int32_t> positions, int heads, int head_dim, float eps,
                     bool add_one, int rotary_dim, float theta) override {
    const HeadRows rows[] = {{x, w, heads}};
    rms_norm_ropes(rows, positions, head_dim, eps, add_one, rotary_dim, theta);
  }
  void rms_norm_ropes(std::span<const HeadRows> xs, std::span<const int32_t> positions, int head_dim, float eps,
                      bool add_one, int rotary_dim, float theta) override {
    check_rotary(rotary_dim, head_dim);
    if (positions.empty() || xs.empty()) return;
    if (!fused_norms()) {
      for (const HeadRows& r : xs)
        Backend::rms_norm_rope(r.x, r.w, positions, r.heads, head_dim, eps, add_one, rotary_dim, theta);
      return;
    }
    // rotary_dim 0: the same kernel normalises only (it reads neither positions nor the table).
    RopeInputs in = rotary_dim > 0 ? rope_inputs(positions, rotary_dim, theta) : RopeInputs{};
    in_groups<kMaxNormRopeTensors>(xs, [&](std::span<const HeadRows> group) {
      NormRopeTensors t;
      for (const HeadRows& r : group) {
        t.x[t.count] = r.x;
        t.w[t.count] = r.w;
        t.heads[t.count++] = r.heads;
      }
      MXLM_CUDA_CHECK(launch_rms_norm_ropes(t, positions.size(), head_dim, eps, add_one, in.positions, rotary_dim,
                                            in.inv_freq, stream_));
    });
  }
  void swiglu_oai(const float* gate, const float* up, float* out, size_t n, SwigluParams p) override {
    MXLM_CUDA_CHECK(launch_swiglu_oai(gate, up, out, n, p.alpha, p.limit, stream_));
  }
  void qdq_mxfp4(float* x, size_t rows, size_t k) override {
    if (k % mx::kBlockSize != 0) fail("MXFP4 activation QDQ over K = {} (not a multiple of 32)", k);
    MXLM_CUDA_CHECK(launch_qdq_f32(x, rows * k, stream_));
  }

  // ---- matrix products
  // bf16 weights of a decode-sized step over one x: one grouped GEMV launch (MXLM_CUDA_BF16_GEMV=0,
  // MXLM_CUDA_LINEAR_GROUPS=0 (benchmark baseline) or any other format / shape: one linear each).
  void linears(const float* x, size_t m, std::span<const Weight* const> ws, std::span<float* const> ys) override {
    if (ws.size() != ys.size()) fail("linears: {} weights for {} outputs", ws.size(), ys.size());
    const char* groups_env = std::getenv("MXLM_CUDA_LINEAR_GROUPS");
    bool grouped = ws.size() > 1 && ws.size() <= static_cast<size_t>(kBf16GemvMaxGroup) && bf16_gemv_enabled() &&
                   (groups_env == nullptr || groups_env[0] != '0') && reinterpret_cast<uintptr_t>(x) % 16 == 0;
    for (size_t i = 0; grouped && i < ws.size(); ++i)
      grouped = ws[i]->format() == WeightFormat::BF16 && ws[i]->cols() == ws[0]->cols() &&
                bf16_gemv_supports(static_cast<int>(ws[i]->rows()), static_cast<int>(ws[i]->cols()), static_cast<int>(m));
    if (!grouped) return Backend::linears(x, m, ws, ys);
    Bf16GemvGroup group;
    for (size_t i = 0; i < ws.size(); ++i) {
      group.w[group.count] = static_cast<const uint16_t*>(dev(*ws[i]).data_);
      group.y[group.count] = ys[i];
      group.n[group.count++] = static_cast<int>(ws[i]->rows());
    }
    MXLM_CUDA_CHECK(launch_bf16_gemv_group(group, x, static_cast<int>(m), static_cast<int>(ws[0]->cols()), sms_, true,
                                           stream_));
  }

  void linear(const float* x, size_t m, const Weight& w, float* y) override {
    if (m == 0) return;
    const DeviceWeight& dw = dev(w);
    const int n = static_cast<int>(w.rows()), k = static_cast<int>(w.cols());
    switch (w.format()) {
      case WeightFormat::F32:
      case WeightFormat::F16: {
        if (m <= kF32GemvMaxTokens && k % 4 == 0) {  // the router at decode: 13-20 -> ~4 µs (H100)
          MXLM_CUDA_CHECK(
              launch_f32_gemv(static_cast<const float*>(dw.data_), x, y, n, static_cast<int>(m), k, stream_));
          break;
        }
        const float one = 1.0f, zero = 0.0f;
        check(cublasSgemm(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, n, static_cast<int>(m), k, &one,
                          static_cast<const float*>(dw.data_), k, x, k, &zero, y, n),
              "cublasSgemm");
        break;
      }
      case WeightFormat::BF16: {
        // Decode-sized steps: our GEMV (weights prefetched under PDL, no conversion kernel); MXLM_CUDA_BF16_GEMV=0
        // keeps cuBLAS (benchmark baseline).
        if (bf16_gemv_enabled() && bf16_gemv_supports(n, k, static_cast<int>(m)) &&
            reinterpret_cast<uintptr_t>(x) % 16 == 0) {
          MXLM_CUDA_CHECK(launch_bf16_gemv(static_cast<const uint16_t*>(dw.data_), x, y, n, static_cast<int>(m), k,
                                           sms_, true, stream_));
          break;
        }
        Block xb(pool_, m * static_cast<size_t>(k) * 2);
        MXLM_CUDA_CHECK(launch_f32_to_bf16(x, xb.as<uint16_t>(), m * static_cast<size_t>(k), stream_));
        gemm_bf16(static_cast<const uint16_t*>(dw.data_), xb.as<uint16_t>(), y, n, static_cast<int>(m), k);
        break;
      }
      case WeightFormat::MXFP4: {
        if (options_.moe_backend == MoeBackend::Native && m <= 8 && reinterpret_cast<uintptr_t>(x) % 16 == 0) {
          mxfp4_gemv(dw, nullptr, x, m, y);  // the GEMV rounds the f32 activations to bf16 as it stages them
          break;
        }
        Block xb(pool_, m * static_cast<size_t>(k) * 2);
        MXLM_CUDA_CHECK(launch_f32_to_bf16(x, xb.as<uint16_t>(), m * static_cast<size_t>(k), stream_));
        mxfp4_linear_bf16(dw, xb.as<uint16_t>(), m, y);
        break;
      }
    }
  }

  void embedding(const Weight& table, std::span<const int32_t> ids, int64_t row_offset, float* out) override {
    if (ids.empty()) return;
    const DeviceWeight& dw = dev(table);
    const TableFormat f = table.format() == WeightFormat::MXFP4  ? TableFormat::MXFP4
                          : table.format() == WeightFormat::BF16 ? TableFormat::BF16
                                                                 : TableFormat::F32;
    Block d;
    const int32_t* dids = bound_tokens(ids);
    if (!dids) {
      d = to_device(ids);
      dids = d.as<int32_t>();
    }
    MXLM_CUDA_CHECK(launch_embedding(dw.data_, dw.scales_, f, table.rows(), table.cols(), dids, ids.size(), row_offset,
                                     out, stream_));
  }

  // ---- decoding
  void argmax_rows(const float* x, size_t rows, size_t cols, int32_t* out) override {
    if (rows == 0) return;
    if (cols == 0) fail("argmax over rows of 0 columns");
    Block workspace(pool_, argmax_rows_workspace_bytes(rows, cols));
    MXLM_CUDA_CHECK(launch_argmax_rows(x, rows, cols, out, workspace.as<void>(), stream_));
  }
  void sample_rows(const float* x, size_t rows, size_t cols, std::span<const SampleParams> params,
                   int32_t* out) override {  // cuda_sample.cu
    if (rows == 0) return;
    if (params.size() != rows) fail("sample_rows: {} parameter sets for {} rows", params.size(), rows);
    if (cols == 0 || cols > 0xFFFFFFFFu) fail("sampling from rows of {} columns", cols);
    for (const SampleParams& p : params) validate(p);
    Block d = to_device(params);
    MXLM_CUDA_CHECK(launch_sample_rows(x, rows, cols, d.as<SampleParams>(), out, stream_));
  }

  // ---- mixture of experts
  void router(const float* x, size_t tokens, const Weight& w, const float* bias, int k, float scale, int32_t* ids,
              float* weights) override {
    const int experts = static_cast<int>(w.rows());
    if (k <= 0 || k > experts) fail("router top-k {} with {} experts", k, experts);
    if (k > kRouterMaxTopK || experts > kRouterMaxExperts)
      fail("CUDA router: top-k {} of {} experts is beyond this backend's limits (top-k <= {}, experts <= {})", k,
           experts, kRouterMaxTopK, kRouterMaxExperts);
    if (tokens == 0) return;
    Block logits(pool_, tokens * static_cast<size_t>(experts) * 4);
    linear(x, tokens, w, logits.as<float>());
    MXLM_CUDA_CHECK(launch_router_topk(logits.as<float>(), bias, tokens, experts, k, scale, ids, weights, stream_));
  }

  void moe_experts(const float* x, size_t tokens, const int32_t* ids, const float* weights, int k,
                   std::span<const Weight* const> gate, std::span<const Weight* const> up,
                   std::span<const Weight* const> down, int first_expert, SwigluParams p, bool qdq_inputs,
                   const SharedExpert* shared, float* out) override;

  // ---- attention
  DType cache_dtype() const override { return options_.kv_cache_dtype; }
  std::unique_ptr<Buffer> alloc_cache(size_t elements) override {
    return alloc(cache_type() == CacheType::BF16 ? (elements + 1) / 2 : elements);
  }

  void cache_write(const float* x, size_t width, std::span<const int64_t> slots, float* cache) override {
    const CacheRows rows[] = {{x, width, cache}};
    cache_writes(rows, slots);
  }
  void cache_writes(std::span<const CacheRows> xs, std::span<const int64_t> slots) override {
    if (slots.empty() || xs.empty()) return;
    Block s;
    const int64_t* dslots = bound_slots(slots);
    if (!dslots) {
      s = to_device(slots);
      dslots = s.as<int64_t>();
    }
    in_groups<kMaxCacheWrites>(xs, [&](std::span<const CacheRows> group) {
      CacheWrites w;
      for (const CacheRows& r : group) {
        w.x[w.count] = r.x;
        w.width[w.count] = r.width;
        w.cache[w.count++] = r.cache;
      }
      MXLM_CUDA_CHECK(launch_cache_writes(w, dslots, slots.size(), cache_type(), stream_));
    });
  }

  void attention(const float* q, const AttentionBatch& batch, const AttentionShape& shape, const float* k_cache,
                 const float* v_cache, float* out) override {
    RowsOnDevice r = rows_of(batch);
    if (r.rows.rows == 0) return;
    run_attention(q, r, shape, k_cache, v_cache, nullptr, 0, r.max_pos / batch.block_size + 1, out);
  }

  void index_select(const float* iq, const AttentionBatch& batch, const IndexerShape& shape, const float* index_k_cache,
                    int32_t* blocks) override {
    RowsOnDevice r = rows_of(batch);
    if (r.rows.rows == 0) return;
    const int max_visible = r.max_pos / batch.block_size + 1;
    Block ws(pool_, index_select_workspace_floats(r.rows.rows, shape.num_heads, max_visible) * 4);
    MXLM_CUDA_CHECK(launch_index_select(iq, r.rows, shape.num_heads, shape.head_dim, shape.topk_blocks,
                                        shape.local_blocks, shape.init_blocks, max_visible, index_k_cache, cache_type(),
                                        ws.as<float>(), sms_, blocks, stream_));
  }

  void sparse_attention(const float* q, const AttentionBatch& batch, const AttentionShape& shape, const float* k_cache,
                        const float* v_cache, const int32_t* blocks, int topk, float* out) override {
    RowsOnDevice r = rows_of(batch);
    if (r.rows.rows == 0) return;
    run_attention(q, r, shape, k_cache, v_cache, blocks, topk, topk, out);
  }

  // ---- vision encoder (cuda_vision.cpp)
  void add_bias(float* y, const float* bias, size_t rows, size_t cols) override;
  void layer_norm(const float* x, const float* w, const float* b, float* out, size_t rows, size_t dim,
                  float eps) override;
  void gelu_erf(float* x, size_t n) override;
  void rope_table(float* x, const float* cos, const float* sin, size_t tokens, int heads, int head_dim,
                  int pairs) override;
  void segment_attention(const float* q, const float* k, const float* v, std::span<const int32_t> bounds, int heads,
                         int head_dim, float scale, float* out, bool bf16_products = false) override;

  // ---- step metadata and captured decode steps (cuda_graph.cpp)
  std::unique_ptr<StepBinding> bind_step(const AttentionBatch& batch, std::span<const int32_t> tokens,
                                         StepGraph* graph = nullptr) override;
  bool supports_step_graphs() const override { return true; }
  std::unique_ptr<StepGraph> make_step_graph(int rows, int pages) override;
  void run_step(StepGraph& graph, const std::function<void()>& body) override;
  void capture_step(StepGraph& graph, const std::function<void()>& body) override;
  void replay_step(StepGraph& graph, const AttentionBatch& batch, std::span<const int32_t> tokens) override;

  // ---- tensor parallelism (cuda_tp.cpp): NCCL collectives on stream_; at TP = 1 no-op / copy.
  int tp_rank() const override { return options_.tp ? options_.tp_rank : 0; }
  int tp_size() const override;
  void all_reduce_sum(float* x, size_t n) override;
  void abort_collectives(const std::string& reason) override;  // cuda_tp.cpp
  void all_gather_cols(const float* x, size_t rows, size_t cols_per_rank, float* out) override;

 private:
  // f(run) for consecutive runs of at most N items of xs: the grouped launches take a fixed number of tensors.
  template <size_t N, typename T, typename F>
  static void in_groups(std::span<const T> xs, F&& f) {
    for (size_t first = 0; first < xs.size(); first += N) f(xs.subspan(first, std::min(N, xs.size() - first)));
  }
  static bool fused_norms() {
    const char* env = std::getenv("MXLM_CUDA_FUSED_NORMS");
    return env == nullptr || env[0] != '0';
  }
  static void check_rotary(int rotary_dim, int head_dim) {
    if (rotary_dim % 2 != 0 || rotary_dim > head_dim || rotary_dim < 0)
      fail("rotary_dim {} invalid for head_dim {}", rotary_dim, head_dim);
  }
  // RoPE's device inputs: the step's positions (bound ones when a step binding holds them, else uploaded into
  // `upload`, which the caller keeps until the launch is queued) and the inv_freq table (one per (theta, rotary_dim),
  // kept for the backend's life: a captured step reads it at every replay).
  struct RopeInputs {
    const int32_t* positions = nullptr;
    const float* inv_freq = nullptr;
    Block upload;
  };
  RopeInputs rope_inputs(std::span<const int32_t> positions, int rotary_dim, float theta) {
    const int half = rotary_dim / 2;
    const uint64_t key = (uint64_t{std::bit_cast<uint32_t>(theta)} << 32) | static_cast<uint32_t>(rotary_dim);
    auto f = inv_freq_.find(key);
    if (f == inv_freq_.end()) {
      std::vector<float> inv_freq(static_cast<size_t>(half));
      for (int j = 0; j < half; ++j)  // as the CPU backend (transformers): theta ** (2j / dim) in f32, reciprocal
        inv_freq[static_cast<size_t>(j)] =
            1.0f / std::pow(theta, static_cast<float>(2 * j) / static_cast<float>(rotary_dim));
      f = inv_freq_.emplace(key, to_device(std::span<const float>(inv_freq))).first;
    }
    RopeInputs in;
    in.inv_freq = f->second.as<float>();
    in.positions = bound_positions(positions);
    if (!in.positions) {
      in.upload = to_device(positions);
      in.positions = in.upload.as<int32_t>();
    }
    return in;
  }

  // Small host arrays (positions, block tables, routing lists, GEMV descriptors) go through a pinned staging ring,
  // so their copies are truly asynchronous (a pageable copy blocks the host for several microseconds). The ring
  // wraps after a stream synchronisation, when every earlier copy out of it has completed.
  template <typename T>
  Block to_device(std::span<const T> host) {
    const size_t bytes = host.size() * sizeof(T);
    // A captured copy would read the staging ring at replay time, when it holds other data.
    if (capturing_) fail("a host upload of {} bytes in a captured step (only bound step metadata can change)", bytes);
    Block b(pool_, std::max<size_t>(bytes, 4));
    if (bytes == 0) return b;
    if (bytes > kRingBytes / 4) {
      MXLM_CUDA_CHECK(cudaMemcpyAsync(b.as<void>(), host.data(), bytes, cudaMemcpyHostToDevice, stream_));
      return b;
    }
    if (ring_used_ + bytes > kRingBytes) {
      MXLM_CUDA_CHECK(cudaStreamSynchronize(stream_));
      ring_used_ = 0;
    }
    std::memcpy(ring_ + ring_used_, host.data(), bytes);
    MXLM_CUDA_CHECK(cudaMemcpyAsync(b.as<void>(), ring_ + ring_used_, bytes, cudaMemcpyHostToDevice, stream_));
    ring_used_ += (bytes + 255) / 256 * 256;
    return b;
  }
  static constexpr size_t kRingBytes = size_t{8} << 20;
  char* ring_ = nullptr;
  size_t ring_used_ = 0;

  // y[m, n] = x[m, k] · W[n, k]ᵀ with bf16 operands and f32 accumulation and output.
  void gemm_bf16(const uint16_t* w, const uint16_t* x, float* y, int n, int m, int k) {
    const float one = 1.0f, zero = 0.0f;
    check(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, w, CUDA_R_16BF, k, x, CUDA_R_16BF, k, &zero, y,
                       CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "cublasGemmEx(bf16)");
  }

  // Version-4 GEMV where it is the fastest (m <= 4, k = 1024 * {2, 3, 4, 6, 8}), else version 2 (m <= 16):
  // descriptor by value, PDL, deterministic, no memset (cuda_mxfp4_gemv.cu); activations bf16 (xb) or f32 (xf).
  void mxfp4_gemv(const DeviceWeight& w, const uint16_t* xb, const float* xf, size_t m, float* y) {
    const int n = static_cast<int>(w.rows()), k = static_cast<int>(w.cols());
    const Mxfp4GemvGroup g{static_cast<const uint8_t*>(w.data_), w.scales_, xb, y, static_cast<int>(m), n};
    // Version 4 up to 4 tokens (H100: 1.4-1.7x versions 1 and 2 there; from 5 tokens on it repeats its math per 4).
    if (m <= 4 && mxfp4_gemv4_supports(k, static_cast<int>(m))) {
      MXLM_CUDA_CHECK(launch_mxfp4_gemv4(g, n, k, true, stream_, xf));
      return;
    }
    const Mxfp4GemvPlan plan = mxfp4_gemv_plan(n, k, 1, static_cast<int>(m), sms_, mxfp4_gemv_backend_config());
    Block ws(pool_, std::max<size_t>(mxfp4_gemv_workspace_floats(plan, n, static_cast<int>(m)), 1) * 4);
    MXLM_CUDA_CHECK(launch_mxfp4_gemv2(g, n, k, plan, true, ws.as<float>(), gemv_counters(mxfp4_gemv_counters(plan, 1)),
                                       stream_, xf));
  }

  void mxfp4_linear_bf16(const DeviceWeight& w, const uint16_t* xb, size_t m, float* y) {
    const int n = static_cast<int>(w.rows()), k = static_cast<int>(w.cols());
    if (options_.moe_backend == MoeBackend::Native && m <= 8) {
      mxfp4_gemv(w, xb, nullptr, m, y);
      return;
    }
    if (options_.moe_backend == MoeBackend::Native && m <= kMxfp4GemvMaxTokens) {
      // 9..16 tokens: version 1 (H100: 11 us vs 16-18 us for version 2 per 10 MB), descriptor by value, K split
      // into zeroed outputs. Up to kMxfp4GemvMaxTokens tokens as tiles of 16 in one launch: at 32 tokens the
      // dequantize-to-bf16 + cuBLAS path below moves ~8x the weight bytes (a bf16 copy written and read back).
      const Mxfp4GemvGroup g{static_cast<const uint8_t*>(w.data_), w.scales_, xb, y, static_cast<int>(m), n};
      const int split = mxfp4_gemv_k_split(n, k, mxfp4_gemv_token_tiles(static_cast<int>(m)), sms_);
      if (split > 1) MXLM_CUDA_CHECK(cudaMemsetAsync(y, 0, m * static_cast<size_t>(n) * 4, stream_));
      MXLM_CUDA_CHECK(launch_mxfp4_gemv_one(g, n, k, split, stream_));
      return;
    }
    Block wb(pool_, static_cast<size_t>(n) * static_cast<size_t>(k) * 2);
    MXLM_CUDA_CHECK(launch_dequant_mxfp4_bf16(static_cast<const uint8_t*>(w.data_), w.scales_, static_cast<size_t>(n),
                                              static_cast<size_t>(k), wb.as<uint16_t>(), stream_));
    gemm_bf16(wb.as<uint16_t>(), xb, y, n, static_cast<int>(m), k);
  }

  // Split-K tile counters of the version-2 GEMV (zero between launches; each launch leaves them zero).
  struct DeviceCounters {
    int* ptr = nullptr;
    size_t capacity = 0;
    ~DeviceCounters() {
      if (ptr) cudaFree(ptr);
    }
  };
  DeviceCounters counters_;
  int* gemv_counters(size_t count) {
    if (count > counters_.capacity) {
      MXLM_CUDA_CHECK(cudaStreamSynchronize(stream_));
      if (counters_.ptr) MXLM_CUDA_CHECK(cudaFree(counters_.ptr));
      counters_.ptr = nullptr;
      const size_t cap = std::max<size_t>(count, size_t{1} << 16);
      MXLM_CUDA_CHECK(cudaMalloc(&counters_.ptr, cap * sizeof(int)));
      MXLM_CUDA_CHECK(cudaMemset(counters_.ptr, 0, cap * sizeof(int)));
      counters_.capacity = cap;
    }
    return counters_.ptr;
  }

  // Device arrays of the routed experts' weight pointers of one MoE layer (cuda_moe.cpp), kept per layer (and per
  // shared expert fused in) and re-uploaded only when the pointers change.
  struct ExpertTable {
    std::vector<const void*> host;  // gate, up, down data, then their scales: [6][num_local (+ 1: shared)]
    Block device;
  };
  std::unordered_map<const Weight*, ExpertTable> expert_tables_;
  const uint8_t* const* expert_table(std::span<const Weight* const> gate, std::span<const Weight* const> up,
                                     std::span<const Weight* const> down, const SharedExpert* shared);
  // Whether moe_experts can run `shared` as one more expert of the device-routed launches (cuda_moe.cpp).
  bool shared_expert_fusable(std::span<const Weight* const> gate, const SharedExpert& shared, bool qdq_inputs) const;
  // The device-routed layer (false, having launched nothing, when the step does not fit it); with `shared`, the
  // shared expert runs as local expert num_local of the same launches.
  bool moe_experts_on_device(const float* x, size_t tokens, const int32_t* ids, const float* weights, int k,
                             std::span<const Weight* const> gate, std::span<const Weight* const> up,
                             std::span<const Weight* const> down, int first_expert, SwigluParams p, bool qdq_inputs,
                             const SharedExpert* shared, float* out);
  // The routed experts alone: device routing when it fits, else sorted on the host.
  void moe_routed(const float* x, size_t tokens, const int32_t* ids, const float* weights, int k,
                  std::span<const Weight* const> gate, std::span<const Weight* const> up,
                  std::span<const Weight* const> down, int first_expert, SwigluParams p, bool qdq_inputs, float* out);

  CacheType cache_type() const { return options_.kv_cache_dtype == DType::BF16 ? CacheType::BF16 : CacheType::F32; }

  struct RowsOnDevice {
    AttentionRows rows;
    Block pos, offsets, tables;
    int max_pos = 0;
  };

  RowsOnDevice rows_of(const AttentionBatch& batch) {
    if (bound_ && bound_->batch == &batch) {
      RowsOnDevice d;
      d.rows = bound_->rows;
      d.max_pos = bound_->max_pos;
      return d;
    }
    std::vector<int32_t> pos(static_cast<size_t>(batch.num_tokens), 0), offs(static_cast<size_t>(batch.num_tokens), 0);
    std::vector<int32_t> tables;
    int max_pos = 0;
    if (batch.block_size <= 0) fail("attention with block size {}", batch.block_size);
    for (const auto& s : batch.sequences) {
      const int32_t needed = (s.start_pos + s.count + batch.block_size - 1) / batch.block_size;
      if (static_cast<int32_t>(s.block_table.size()) < needed)
        fail("sequence needs {} cache pages for {} tokens but its block table has {}", needed, s.start_pos + s.count,
             s.block_table.size());
      const int32_t off = static_cast<int32_t>(tables.size());
      tables.insert(tables.end(), s.block_table.begin(), s.block_table.end());
      for (int32_t i = 0; i < s.count; ++i) {
        const size_t r = static_cast<size_t>(s.begin + i);
        if (r >= pos.size()) fail("sequence slice row {} outside the step's {} tokens", r, pos.size());
        pos[r] = s.start_pos + i;
        offs[r] = off;
        max_pos = std::max(max_pos, s.start_pos + i);
      }
    }
    RowsOnDevice d;
    d.pos = to_device(std::span<const int32_t>(pos));
    d.offsets = to_device(std::span<const int32_t>(offs));
    d.tables = to_device(std::span<const int32_t>(tables));
    d.rows = {d.pos.as<int32_t>(), d.offsets.as<int32_t>(), d.tables.as<int32_t>(), batch.num_tokens, batch.block_size};
    d.max_pos = max_pos;
    return d;
  }

  void run_attention(const float* q, const RowsOnDevice& r, const AttentionShape& shape, const float* k_cache,
                     const float* v_cache, const int32_t* blocks, int topk, int units, float* out) {
    if (shape.num_kv_heads <= 0 || shape.num_heads % shape.num_kv_heads != 0)
      fail("attention with {} query heads and {} KV heads", shape.num_heads, shape.num_kv_heads);
    if (shape.head_dim <= 0 || shape.head_dim > 256 || shape.head_dim % 8 != 0 ||
        shape.num_heads / shape.num_kv_heads > 16)
      fail("CUDA attention supports head_dim % 8 == 0 up to 256 and up to 16 query heads per KV head (got {}, {})",
           shape.head_dim, shape.num_heads / shape.num_kv_heads);
    const int max_keys = units * r.rows.block_size;
    const int per_split = attention_keys_per_split(r.rows.rows, shape.num_kv_heads, max_keys, sms_);
    const int splits = std::max(1, (max_keys + per_split - 1) / per_split);
    Block ws(pool_, attention_workspace_floats(r.rows.rows, shape.num_heads, shape.head_dim, splits) * 4);
    MXLM_CUDA_CHECK(launch_attention(q, r.rows, shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.scale,
                                     k_cache, v_cache, cache_type(), blocks, topk, max_keys, per_split, ws.as<float>(),
                                     out, stream_));
  }

  // The step bound by bind_step (cuda_graph.cpp): device copies of its metadata, recognised by the host arrays'
  // identity. Ops given other arrays upload them as before.
  struct BoundStep {
    const AttentionBatch* batch = nullptr;
    const int32_t* host_tokens = nullptr;
    size_t num_tokens = 0;
    const int32_t* tokens = nullptr;     // device
    const int32_t* positions = nullptr;  // device, batch.positions
    const int64_t* slots = nullptr;      // device, batch.slots
    AttentionRows rows;                  // device positions / table offsets / tables from batch.sequences
    int max_pos = 0;                     // grids are sized for it
  };
  BoundStep* bound_ = nullptr;
  bool capturing_ = false;
  std::shared_ptr<Pool> graph_pool_;  // scratch of run_step / capture_step (never released: graphs refer to it)
  std::unordered_map<uint64_t, Block> inv_freq_;  // RoPE tables by (theta bits, rotary_dim)

  const int32_t* bound_tokens(std::span<const int32_t> ids) const {
    return bound_ && ids.data() == bound_->host_tokens && ids.size() == bound_->num_tokens ? bound_->tokens : nullptr;
  }
  const int32_t* bound_positions(std::span<const int32_t> positions) const {
    return bound_ && positions.data() == bound_->batch->positions.data() &&
                   positions.size() == bound_->batch->positions.size()
               ? bound_->positions
               : nullptr;
  }
  const int64_t* bound_slots(std::span<const int64_t> slots) const {
    return bound_ && slots.data() == bound_->batch->slots.data() && slots.size() == bound_->batch->slots.size()
               ? bound_->slots
               : nullptr;
  }
  friend class CudaStepBinding;

  CudaOptions options_;
  std::shared_ptr<Pool> pool_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  int sms_ = 132;
  std::string device_name_;
};

}  // namespace mxlm::backend::cuda
