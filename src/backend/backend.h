// The op interface the model is written against. Model code never branches on the backend; a backend never
// knows about models. Activations are f32 row-major [tokens, features] buffers that live wherever the backend
// keeps its memory (host for the CPU backend, device memory for a GPU backend): the model only passes them
// around and reads results back through download(). Host-side arguments (token ids, positions, block tables)
// are plain host arrays described by AttentionBatch.
//
// Numerics contract (DESIGN.md): RMSNorm, router, softmax in f32; MXFP4 weights dequantized exactly; the
// emulation's activation QDQ is an explicit op (qdq_mxfp4) that the model calls before MXFP4 GEMMs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "backend/sampling.h"
#include "core/dtype.h"

namespace mxlm::backend {

// Backend memory holding `count` f32 (or i32, same size) elements.
class Buffer {
 public:
  virtual ~Buffer() = default;
  virtual float* f32() = 0;
  virtual int32_t* i32() = 0;
  virtual size_t size() const = 0;  // elements
};

enum class WeightFormat : uint8_t { F32, BF16, F16, MXFP4 };
const char* weight_format_name(WeightFormat format);

// A [rows, cols] matrix (out x in for a linear layer) or an embedding table, in backend memory.
class Weight {
 public:
  virtual ~Weight() = default;
  virtual WeightFormat format() const = 0;
  virtual int64_t rows() const = 0;
  virtual int64_t cols() const = 0;
  bool mxfp4() const { return format() == WeightFormat::MXFP4; }
};

// Host description of a matrix to upload. For MXFP4, `data` is packed [rows, cols/2] and `scales` [rows, cols/32].
struct WeightData {
  WeightFormat format = WeightFormat::F32;
  int64_t rows = 0;
  int64_t cols = 0;
  const void* data = nullptr;
  const uint8_t* scales = nullptr;
};

// One sequence's slice of a batched step: tokens [begin, begin + count) of the step's rows are its new tokens,
// at absolute positions start_pos .. start_pos + count - 1. Its cache pages are block_table[0..]: logical block b
// (positions [b * block_size, (b + 1) * block_size)) lives in page block_table[b].
struct SequenceSlice {
  int32_t begin = 0;
  int32_t count = 0;
  int32_t start_pos = 0;
  std::span<const int32_t> block_table;
};

struct AttentionBatch {
  std::vector<SequenceSlice> sequences;
  int32_t num_tokens = 0;
  int32_t block_size = 0;
  std::vector<int32_t> positions;  // per row, absolute position
  std::vector<int64_t> slots;      // per row, page * block_size + offset: where its K/V/index-K go
};

struct AttentionShape {
  int num_heads = 0;     // query heads (local to this rank)
  int num_kv_heads = 0;  // KV heads (local)
  int head_dim = 0;
  float scale = 1.0f;
};

struct IndexerShape {
  int num_heads = 0;  // index query heads
  int head_dim = 0;
  int topk_blocks = 0;
  int local_blocks = 1;
  int init_blocks = 0;
};

struct SwigluParams {
  float alpha = 1.702f;
  float limit = 7.0f;
};

// The shared expert of a MoE layer: a SwiGLU-OAI MLP every token runs (gate/up [inter, hidden], down [hidden,
// inter]), handed to moe_experts so a backend can run it inside the routed experts' launches.
struct SharedExpert {
  const Weight* gate = nullptr;
  const Weight* up = nullptr;
  const Weight* down = nullptr;
};

// A step's metadata bound for the ops of one forward (Backend::bind_step); unbinds when destroyed.
class StepBinding {
 public:
  virtual ~StepBinding() = default;
};

// A captured decode step of a fixed row count over at most a fixed number of KV pages per sequence
// (Backend::make_step_graph).
class StepGraph {
 public:
  virtual ~StepGraph() = default;
  virtual int rows() const = 0;
  virtual int pages() const = 0;
  virtual bool captured() const = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // ---- memory
  virtual std::unique_ptr<Buffer> alloc(size_t count) = 0;  // zero-initialised
  virtual void upload(Buffer& dst, size_t offset, const float* src, size_t count) = 0;
  virtual void download(const Buffer& src, size_t offset, float* dst, size_t count) = 0;
  virtual void copy(const float* src, float* dst, size_t count) = 0;
  virtual std::unique_ptr<Weight> upload_weight(const WeightData& data) = 0;
  // A small f32 vector (norm weights, router bias).
  virtual std::unique_ptr<Buffer> upload_vector(std::span<const float> values) = 0;
  // A weight of random values that needs no host data (`--load-format dummy`: full-size models for benchmarks):
  // MXFP4 codes uniform over all 16 with scale bytes uniform in [118, 124] (2^-9 .. 2^-3), float values uniform
  // in +-0.05. Deterministic in `seed` on one backend; backends need not agree bit for bit. The default makes
  // the values on the host and uploads them; a GPU backend makes them on the device.
  virtual std::unique_ptr<Weight> random_weight(WeightFormat format, int64_t rows, int64_t cols, uint64_t seed);

  // ---- elementwise and normalisation
  virtual void add(const float* a, const float* b, float* out, size_t n) = 0;
  virtual void scale(float* x, float factor, size_t n) = 0;
  // out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * (add_one ? 1 + w : w), rows of `dim`; in f32. In place allowed.
  virtual void rms_norm(const float* x, const float* w, float* out, size_t rows, size_t dim, float eps,
                        bool add_one) = 0;
  // NeoX (rotate-half) RoPE on the first rotary_dim dims of each head of x [tokens, heads, head_dim], in place;
  // inv_freq[j] = theta^(-2j / rotary_dim), angle = position * inv_freq in f32.
  virtual void rope(float* x, std::span<const int32_t> positions, int heads, int head_dim, int rotary_dim,
                    float theta) = 0;
  // Fusable pairs of the ops above, with the results of the pair (the defaults run it; a backend may run one kernel).
  // The residual add and the norm after it: h = add(h, y), then out = rms_norm(h) over rows of dim.
  virtual void add_rms_norm(float* h, const float* y, const float* w, float* out, size_t rows, size_t dim, float eps,
                            bool add_one) {
    add(h, y, h, rows * dim);
    rms_norm(h, w, out, rows, dim, eps, add_one);
  }
  // Per-head norm and partial RoPE (q / k of attention and of the indexer): rms_norm of every [head_dim] row of x
  // [tokens, heads, head_dim] with w [head_dim], then rope, in place.
  virtual void rms_norm_rope(float* x, const float* w, std::span<const int32_t> positions, int heads, int head_dim,
                             float eps, bool add_one, int rotary_dim, float theta) {
    rms_norm(x, w, x, positions.size() * static_cast<size_t>(heads), static_cast<size_t>(head_dim), eps, add_one);
    rope(x, positions, heads, head_dim, rotary_dim, theta);
  }
  // rms_norm_rope of tensors that share positions, head_dim and rotary_dim (q and k, and the indexer's where their
  // dims match): one rms_norm_rope each by default; a backend may run them as one launch (same results).
  struct HeadRows {
    float* x;         // [tokens, heads, head_dim], in place
    const float* w;   // [head_dim]
    int heads;
  };
  virtual void rms_norm_ropes(std::span<const HeadRows> xs, std::span<const int32_t> positions, int head_dim,
                              float eps, bool add_one, int rotary_dim, float theta) {
    for (const HeadRows& r : xs) rms_norm_rope(r.x, r.w, positions, r.heads, head_dim, eps, add_one, rotary_dim, theta);
  }
  // SwiGLU-OAI: out = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit).
  virtual void swiglu_oai(const float* gate, const float* up, float* out, size_t n, SwigluParams p) = 0;
  // MX emulation: quantize-dequantize rows of `k` (k % 32 == 0) in groups of 32, in place.
  virtual void qdq_mxfp4(float* x, size_t rows, size_t k) = 0;

  // ---- matrix products
  // y[m, w.rows] = x[m, w.cols] · wᵀ (f32 accumulation).
  virtual void linear(const float* x, size_t m, const Weight& w, float* y) = 0;
  // ys[i] = linear(x, m, *ws[i]) for weights that read the same x (e.g. q / k / v): one linear each by default; a
  // backend may run them as one launch (sums in an order of its choosing, as linear's).
  virtual void linears(const float* x, size_t m, std::span<const Weight* const> ws, std::span<float* const> ys) {
    for (size_t i = 0; i < ws.size(); ++i) linear(x, m, *ws[i], ys[i]);
  }
  // out[i] = table[ids[i] - row_offset] for ids inside [row_offset, row_offset + table.rows), else 0 (vocab-parallel).
  virtual void embedding(const Weight& table, std::span<const int32_t> ids, int64_t row_offset, float* out) = 0;

  // ---- decoding
  // out[r] = the first index of the largest value of row r of x [rows, cols] (greedy sampling on the device, so only
  // token ids travel to the host). out is backend memory. The default goes through the host.
  virtual void argmax_rows(const float* x, size_t rows, size_t cols, int32_t* out);
  // out[r] = sample_row(row r of x, params[r]) (sampling.h: one exact algorithm, so every backend draws the same
  // token), so that only token ids travel to the host. out is backend memory. The default goes through the host.
  virtual void sample_rows(const float* x, size_t rows, size_t cols, std::span<const SampleParams> params,
                           int32_t* out);

  // ---- mixture of experts
  // Router: logits = x · wᵀ (f32), s = sigmoid(logits), choose top-k by s + bias (bias may be null), weights =
  // the chosen s renormalised to sum 1, times `scale`. ids/weights are [tokens, k].
  virtual void router(const float* x, size_t tokens, const Weight& w, const float* bias, int k, float scale,
                      int32_t* ids, float* weights) = 0;
  // Routed experts: out[t] = Σ_j weights[t, j] · down_e(act(gate_e(x_t), up_e(x_t))) with e = ids[t, j], for
  // experts this rank holds (first_expert .. first_expert + gate.size() - 1; other ids are skipped). With
  // qdq_inputs the inputs of both GEMMs are quantize-dequantized first (MXFP4 emulation).
  // With `shared` (null: none) every token also runs the shared expert, added last with weight 1:
  // out[t] = routed[t] + shared(x_t), rounded as add(routed, shared) - the routed sum first, in ascending expert
  // order, then the shared expert's output. Each of its linears QDQs its input when that weight is MXFP4 (the
  // model's emulation of an MXFP4 linear), whatever qdq_inputs says. A backend may run it inside the routed
  // experts' launches (CUDA native) or unfused (add_shared_expert); the results agree up to f32 summation order.
  virtual void moe_experts(const float* x, size_t tokens, const int32_t* ids, const float* weights, int k,
                           std::span<const Weight* const> gate, std::span<const Weight* const> up,
                           std::span<const Weight* const> down, int first_expert, SwigluParams p, bool qdq_inputs,
                           const SharedExpert* shared, float* out) = 0;

  // ---- paged attention. A cache layer is [num_pages, block_size, width] (width = kv_heads * head_dim for K and V,
  // index_dim for index-K) elements of cache_dtype(): f32 unless the backend was configured otherwise (the CUDA
  // backend's kv_cache_dtype BF16 halves the bytes decode attention reads). alloc_cache gives a zeroed layer of
  // `elements` elements; the cache ops take its f32() pointer as a handle, which is f32 data only when
  // cache_dtype() is F32 (cache_write converts).
  virtual DType cache_dtype() const { return DType::F32; }
  virtual std::unique_ptr<Buffer> alloc_cache(size_t elements) { return alloc(elements); }
  // cache[slots[i]] = row i of x [slots, width]; rows whose slot is negative are skipped (padding rows of a captured
  // decode step).
  virtual void cache_write(const float* x, size_t width, std::span<const int64_t> slots, float* cache) = 0;
  // cache_write of several tensors at the same slots (a layer's K, V and index K): one cache_write each by default; a
  // backend may run them as one launch.
  struct CacheRows {
    const float* x;  // [slots, width]
    size_t width;
    float* cache;    // the cache layer's handle
  };
  virtual void cache_writes(std::span<const CacheRows> xs, std::span<const int64_t> slots) {
    for (const CacheRows& r : xs) cache_write(r.x, r.width, slots, r.cache);
  }
  // Causal attention of every new token over its sequence's cached keys 0..position (GQA). q, out: [tokens,
  // heads * head_dim].
  virtual void attention(const float* q, const AttentionBatch& batch, const AttentionShape& shape, const float* k_cache,
                         const float* v_cache, float* out) = 0;
  // Lightning indexer (transformers 5.17 and vLLM agree): per index head h, block score = max over the block's
  // visible tokens of iq_h · ik (no scale); the local block(s) (and init blocks) are forced; top-k. Index head h
  // selects for KV head h, so shape.num_heads must equal the (local) KV heads. blocks: [tokens, heads, topk],
  // block ids left-packed in descending score order, then -1.
  virtual void index_select(const float* iq, const AttentionBatch& batch, const IndexerShape& shape,
                            const float* index_k_cache, int32_t* blocks) = 0;
  // Exact attention of each KV head's query group restricted to that head's selected blocks, causally masked.
  virtual void sparse_attention(const float* q, const AttentionBatch& batch, const AttentionShape& shape,
                                const float* k_cache, const float* v_cache, const int32_t* blocks, int topk,
                                float* out) = 0;

  // ---- vision encoder (the CLIP-style image tower: model/vision_tower.h)
  // y[r, c] += bias[c] for `rows` rows of `cols`, in place.
  virtual void add_bias(float* y, const float* bias, size_t rows, size_t cols) = 0;
  // out[r] = (x[r] - mean) / sqrt(var + eps) * w + b over rows of `dim` (biased variance), in f32. In place allowed.
  virtual void layer_norm(const float* x, const float* w, const float* b, float* out, size_t rows, size_t dim,
                          float eps) = 0;
  // Exact GELU, x = 0.5 x (1 + erf(x / sqrt 2)), in place.
  virtual void gelu_erf(float* x, size_t n) = 0;
  // Rotate-half rotary with per-row angles given as tables: for each of `tokens` rows of x [tokens, heads,
  // head_dim] and each head, the pair (x[k], x[k + pairs]) for k < pairs is rotated by the angle whose cosine and
  // sine are cos[t, k], sin[t, k] ([tokens, pairs] in backend memory); dims from 2 * pairs on pass through. The
  // vision tower's 3D t/h/w rotary (shared/spec/m3_vision.md §4) is this with angles position_axis · inv_freq.
  virtual void rope_table(float* x, const float* cos, const float* sin, size_t tokens, int heads, int head_dim,
                          int pairs) = 0;
  // Bidirectional (non-causal) attention within segments: rows [bounds[i], bounds[i + 1]) attend to the keys and
  // values of those same rows only (one segment per image). q, k, v, out: [tokens, heads * head_dim] with
  // tokens = bounds.back(); bounds starts at 0 and never decreases. Softmax in f32. With bf16_products a backend
  // may round q, k, v and the probabilities to bf16 for its two matrix products (f32 accumulation): the CUDA backend
  // does (tensor cores), for towers with bf16 weights whose linears round their inputs to bf16 anyway; the CPU
  // backend always computes in f32.
  virtual void segment_attention(const float* q, const float* k, const float* v, std::span<const int32_t> bounds,
                                 int heads, int head_dim, float scale, float* out, bool bf16_products = false) = 0;

  // ---- step metadata and captured decode steps (CUDA graphs; model/step_graphs.h says how the model uses them)
  // Binds one step's host metadata (`batch`, and `tokens` for the embedding) for the ops of one forward: while the
  // returned binding lives, an op handed the bound arrays themselves (the batch object, or spans with the data
  // pointers of tokens / batch.positions / batch.slots) may read copies the backend made once for the step instead
  // of uploading per op. With a StepGraph the copies go to that graph's fixed buffers and the attention / indexer
  // grids are sized for the graph's rows and pages instead of the step's (splits past a row's context do nothing);
  // the batch must then have exactly graph.rows() rows, one token per sequence, and every sequence must fit in
  // graph.pages() pages. The default binds nothing (null): ops read their host arguments (the CPU backend).
  virtual std::unique_ptr<StepBinding> bind_step(const AttentionBatch& batch, std::span<const int32_t> tokens,
                                                 StepGraph* graph = nullptr);
  // Whether make_step_graph / run_step / capture_step / replay_step work (default: no).
  virtual bool supports_step_graphs() const { return false; }
  // A graph of a decode step of `rows` rows over at most `pages` KV pages per sequence: its fixed metadata buffers
  // and its own scratch memory; nothing is captured yet.
  virtual std::unique_ptr<StepGraph> make_step_graph(int rows, int pages);
  // Runs `body` now, eagerly (the step before a capture, and the eager path the replays are checked against).
  // `body` binds the step with the graph (bind_step) before its ops.
  virtual void run_step(StepGraph& graph, const std::function<void()>& body);
  // Records `body`'s launches for replay_step (after run_step made every lazily made resource; `body` may run once
  // more eagerly first, recomputing the same step). An Error (the graph stays uncaptured) when an op of `body` needs
  // the host (a download, a host upload).
  virtual void capture_step(StepGraph& graph, const std::function<void()>& body);
  // Copies `batch` / `tokens` into the graph's fixed buffers and launches the captured step (asynchronously: read
  // its output with download()). The batch must fit the graph as for bind_step.
  virtual void replay_step(StepGraph& graph, const AttentionBatch& batch, std::span<const int32_t> tokens);

  // ---- tensor parallelism (no-ops at TP = 1)
  virtual int tp_rank() const { return 0; }
  virtual int tp_size() const { return 1; }
  virtual void all_reduce_sum(float* x, size_t n) = 0;
  // A rank of this backend's tensor-parallel group failed in the middle of a step: every rank's pending and later
  // collectives fail with an Error naming `reason` instead of waiting for the failed rank forever (NCCL: the group's
  // communicators are aborted). The group cannot be used again. No-op at TP = 1.
  virtual void abort_collectives(const std::string& reason) { (void)reason; }
  // Concatenates each rank's [rows, cols_per_rank] along columns into out [rows, cols_per_rank * tp_size].
  virtual void all_gather_cols(const float* x, size_t rows, size_t cols_per_rank, float* out) = 0;

 protected:
  // moe_experts' shared expert unfused, as the model ran it before moe_experts took it: out += the shared MLP of
  // x [tokens, hidden] through this backend's own ops (copy + qdq_mxfp4 before each MXFP4 linear, linear,
  // swiglu_oai, add). An Error when the shared expert's shapes do not fit `hidden` and each other.
  void add_shared_expert(const float* x, size_t tokens, size_t hidden, const SharedExpert& shared, SwigluParams p,
                         float* out);
  // The Error of add_shared_expert for a shared expert that does not fit (for backends that fuse it).
  static void check_shared_expert(const SharedExpert& shared, size_t hidden);
};

// The CPU backend (f32 activations, OpenMP), the reference every other backend is tested against.
std::unique_ptr<Backend> make_cpu_backend();

}  // namespace mxlm::backend
