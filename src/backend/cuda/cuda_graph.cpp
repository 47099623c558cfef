// Step metadata and captured decode steps (CUDA graphs), vLLM's way: a decode step of a fixed padded row count is
// captured once and replayed; everything that changes between steps (token ids, positions, KV slots, block tables)
// lives in the graph's fixed device buffers, refreshed before each replay by one copy out of the graph's fixed pinned
// staging (the copy is the graph's first node), and the attention / indexer grids are sized for the graph's page
// capacity instead of the step's context. Scratch memory of captured steps comes from a pool of its own, so eager
// steps never reuse (or free) a block a graph refers to, and nothing persistent is ever allocated from it.
#include "backend/cuda/cuda_backend_impl.h"

namespace mxlm::backend::cuda {

namespace {

// One step's metadata as one block of bytes: slots (i64), then i32 token ids, RoPE positions, attention positions,
// block-table offsets, block tables.
struct MetadataLayout {
  size_t rows = 0, table_entries = 0;
  size_t slots() const { return 0; }
  size_t tokens() const { return rows * 8; }
  size_t positions() const { return tokens() + rows * 4; }
  size_t attn_pos() const { return positions() + rows * 4; }
  size_t offsets() const { return attn_pos() + rows * 4; }
  size_t tables() const { return offsets() + rows * 4; }
  size_t bytes() const { return tables() + std::max<size_t>(table_entries, 1) * 4; }
};

// Writes the metadata of `batch` into `dst` (layout `l`) and returns the largest attention position. With
// fixed_pages > 0 every sequence's table takes fixed_pages entries (sequence i at i * fixed_pages), as a graph's
// buffers have it; otherwise the tables are concatenated.
int write_metadata(const AttentionBatch& batch, std::span<const int32_t> tokens, const MetadataLayout& l,
                   int fixed_pages, char* dst) {
  const size_t T = static_cast<size_t>(batch.num_tokens);
  if (batch.block_size <= 0) fail("attention with block size {}", batch.block_size);
  if (tokens.size() != T || batch.positions.size() != T || batch.slots.size() != T)
    fail("step of {} rows with {} tokens, {} positions, {} slots", T, tokens.size(), batch.positions.size(),
         batch.slots.size());
  if (T != l.rows) fail("step of {} rows bound to buffers of {} rows", T, l.rows);
  std::memcpy(dst + l.slots(), batch.slots.data(), T * 8);
  std::memcpy(dst + l.tokens(), tokens.data(), T * 4);
  std::memcpy(dst + l.positions(), batch.positions.data(), T * 4);
  auto* pos = reinterpret_cast<int32_t*>(dst + l.attn_pos());
  auto* offs = reinterpret_cast<int32_t*>(dst + l.offsets());
  auto* tables = reinterpret_cast<int32_t*>(dst + l.tables());
  std::fill(pos, pos + T, 0);
  std::fill(offs, offs + T, 0);
  std::fill(tables, tables + std::max<size_t>(l.table_entries, 1), 0);
  int max_pos = 0;
  size_t used = 0;
  for (size_t i = 0; i < batch.sequences.size(); ++i) {
    const SequenceSlice& s = batch.sequences[i];
    const int32_t needed = (s.start_pos + s.count + batch.block_size - 1) / batch.block_size;
    if (static_cast<int32_t>(s.block_table.size()) < needed)
      fail("sequence needs {} cache pages for {} tokens but its block table has {}", needed, s.start_pos + s.count,
           s.block_table.size());
    size_t off = used, n = s.block_table.size();
    if (fixed_pages > 0) {
      if (needed > fixed_pages) fail("sequence needs {} cache pages; the captured step holds {}", needed, fixed_pages);
      off = i * static_cast<size_t>(fixed_pages);
      n = std::min(n, static_cast<size_t>(fixed_pages));
    }
    if (off + n > std::max<size_t>(l.table_entries, 1) && n > 0)
      fail("block tables of the step overflow its {} entries", l.table_entries);
    std::copy_n(s.block_table.begin(), n, tables + off);
    used = off + n;
    for (int32_t j = 0; j < s.count; ++j) {
      const size_t r = static_cast<size_t>(s.begin + j);
      if (s.begin < 0 || r >= T) fail("sequence slice row {} outside the step's {} tokens", r, T);
      pos[r] = s.start_pos + j;
      offs[r] = static_cast<int32_t>(off);
      max_pos = std::max(max_pos, s.start_pos + j);
    }
  }
  return max_pos;
}

}  // namespace

class CudaStepGraph final : public StepGraph {
 public:
  CudaStepGraph(int rows, int pages) : rows_(rows), pages_(pages) {
    layout.rows = static_cast<size_t>(rows);
    layout.table_entries = static_cast<size_t>(rows) * static_cast<size_t>(pages);
    MXLM_CUDA_CHECK(cudaMalloc(&device, layout.bytes()));
    MXLM_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&staging), layout.bytes(), cudaHostAllocDefault));
    MXLM_CUDA_CHECK(cudaEventCreateWithFlags(&staged, cudaEventDisableTiming));
  }
  ~CudaStepGraph() override {
    if (exec) cudaGraphExecDestroy(exec);
    cudaEventSynchronize(staged);
    cudaEventDestroy(staged);
    cudaFreeHost(staging);
    cudaFree(device);
  }
  int rows() const override { return rows_; }
  int pages() const override { return pages_; }
  bool captured() const override { return exec != nullptr; }

  // Host writes to the staging area wait until the copy out of it that the last step enqueued has run.
  void stage(const AttentionBatch& batch, std::span<const int32_t> tokens) {
    MXLM_CUDA_CHECK(cudaEventSynchronize(staged));
    write_metadata(batch, tokens, layout, pages_, staging);
  }

  MetadataLayout layout;
  char* device = nullptr;
  char* staging = nullptr;
  cudaEvent_t staged = nullptr;
  cudaGraphExec_t exec = nullptr;

 private:
  int rows_, pages_;
};

class CudaStepBinding final : public StepBinding {
 public:
  CudaStepBinding(CudaBackend& backend, const AttentionBatch& batch, std::span<const int32_t> tokens)
      : backend_(backend), previous_(backend.bound_) {
    step_.batch = &batch;
    step_.host_tokens = tokens.data();
    step_.num_tokens = tokens.size();
  }
  ~CudaStepBinding() override { backend_.bound_ = previous_; }

  // Points the bound step at metadata laid out as `l` at device address `base`.
  void bind(const MetadataLayout& l, const char* base, int block_size, int max_pos) {
    step_.slots = reinterpret_cast<const int64_t*>(base + l.slots());
    step_.tokens = reinterpret_cast<const int32_t*>(base + l.tokens());
    step_.positions = reinterpret_cast<const int32_t*>(base + l.positions());
    step_.rows = {reinterpret_cast<const int32_t*>(base + l.attn_pos()),
                  reinterpret_cast<const int32_t*>(base + l.offsets()),
                  reinterpret_cast<const int32_t*>(base + l.tables()), static_cast<int>(l.rows), block_size};
    step_.max_pos = max_pos;
    backend_.bound_ = &step_;
  }
  Block storage;  // an eager step's device copy

 private:
  CudaBackend& backend_;
  CudaBackend::BoundStep* previous_;
  CudaBackend::BoundStep step_;
};

std::unique_ptr<StepBinding> CudaBackend::bind_step(const AttentionBatch& batch, std::span<const int32_t> tokens,
                                                    StepGraph* graph) {
  auto binding = std::make_unique<CudaStepBinding>(*this, batch, tokens);
  if (batch.num_tokens <= 0) return binding;  // nothing to bind: ops of an empty step return early
  if (!graph) {
    MetadataLayout l;
    l.rows = static_cast<size_t>(batch.num_tokens);
    for (const auto& s : batch.sequences) l.table_entries += s.block_table.size();
    std::vector<char> host(l.bytes());
    const int max_pos = write_metadata(batch, tokens, l, 0, host.data());
    binding->storage = to_device(std::span<const char>(host));
    binding->bind(l, binding->storage.as<char>(), batch.block_size, max_pos);
    return binding;
  }
  auto& g = static_cast<CudaStepGraph&>(*graph);
  if (!capturing_) {
    // A captured step stages its metadata in replay_step; here the copy only has to be enqueued (or recorded).
    g.stage(batch, tokens);
  }
  MXLM_CUDA_CHECK(cudaMemcpyAsync(g.device, g.staging, g.layout.bytes(), cudaMemcpyHostToDevice, stream_));
  if (!capturing_) MXLM_CUDA_CHECK(cudaEventRecord(g.staged, stream_));
  // Grids for the graph's capacity: every row may reach pages() pages.
  binding->bind(g.layout, g.device, batch.block_size, g.pages() * batch.block_size - 1);
  return binding;
}

std::unique_ptr<StepGraph> CudaBackend::make_step_graph(int rows, int pages) {
  if (rows <= 0 || pages <= 0) fail("a captured step of {} rows and {} pages", rows, pages);
  return std::make_unique<CudaStepGraph>(rows, pages);
}

namespace {

// The graph pool stands in for the backend's pool while a step of a graph runs or is captured.
class PoolSwap {
 public:
  PoolSwap(std::shared_ptr<Pool>& a, std::shared_ptr<Pool>& b) : a_(a), b_(b) { std::swap(a_, b_); }
  ~PoolSwap() { std::swap(a_, b_); }
  PoolSwap(const PoolSwap&) = delete;
  PoolSwap& operator=(const PoolSwap&) = delete;

 private:
  std::shared_ptr<Pool>& a_;
  std::shared_ptr<Pool>& b_;
};

}  // namespace

void CudaBackend::run_step(StepGraph&, const std::function<void()>& body) {
  if (capturing_) fail("run_step inside a capture");
  // The backend's own pool: whatever the step makes lazily and keeps (expert pointer tables, RoPE tables) must not
  // come from the graph pool, whose free blocks captured graphs use as scratch.
  body();
}

void CudaBackend::capture_step(StepGraph& graph, const std::function<void()>& body) {
  auto& g = static_cast<CudaStepGraph&>(graph);
  if (capturing_) fail("nested step capture");
  if (g.exec) {
    cudaGraphExecDestroy(g.exec);
    g.exec = nullptr;
  }
  PoolSwap swap(pool_, graph_pool_);
  // Once eagerly on the graph pool (after run_step made every lazy resource), so that the capture finds every block
  // it needs cached there and calls no cudaMalloc. It recomputes the step run_step ran (same inputs, same cache
  // slots), so it changes nothing.
  body();
  // Nothing of an earlier step may still read the staging ring or the pool when the capture starts.
  MXLM_CUDA_CHECK(cudaStreamSynchronize(stream_));
  ring_used_ = 0;
  // Relaxed: other threads (tensor-parallel ranks capturing their own steps) keep allocating meanwhile.
  MXLM_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed));
  capturing_ = true;
  cudaGraph_t cg = nullptr;
  try {
    body();
  } catch (...) {
    capturing_ = false;
    cudaStreamEndCapture(stream_, &cg);
    if (cg) cudaGraphDestroy(cg);
    (void)cudaGetLastError();
    throw;
  }
  capturing_ = false;
  const cudaError_t end = cudaStreamEndCapture(stream_, &cg);
  if (end != cudaSuccess || !cg) {
    if (cg) cudaGraphDestroy(cg);
    (void)cudaGetLastError();
    fail("capturing a decode step failed: {}", cudaGetErrorString(end));
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&exec, cg, 0);
  cudaGraphDestroy(cg);
  if (inst != cudaSuccess) {
    (void)cudaGetLastError();
    fail("instantiating a captured decode step failed: {}", cudaGetErrorString(inst));
  }
  g.exec = exec;
}

void CudaBackend::replay_step(StepGraph& graph, const AttentionBatch& batch, std::span<const int32_t> tokens) {
  auto& g = static_cast<CudaStepGraph&>(graph);
  if (!g.exec) fail("replay of a step that was not captured");
  g.stage(batch, tokens);
  MXLM_CUDA_CHECK(cudaGraphLaunch(g.exec, stream_));
  MXLM_CUDA_CHECK(cudaEventRecord(g.staged, stream_));
}

}  // namespace mxlm::backend::cuda
