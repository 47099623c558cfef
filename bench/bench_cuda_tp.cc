// Tensor-parallel collectives of the CUDA backend on 2 GPUs (cuda_tp.cpp): all_reduce_sum of [rows, hidden] f32
// activations (the two all-reduces of every layer: attention output and MLP/MoE output) and all_gather_cols of the
// vocab-parallel logits, each through the backend the model calls, timed on rank 0's stream with both ranks driven
// by their own threads (as engine/tp_ranks.h drives them). Ceilings measured in the same process: the peer-to-peer
// copy bandwidth GPU 0 -> GPU 1 and a 256 MiB all-reduce; latency-bound sizes are compared with the 1-element
// all-reduce.
//   bench_cuda_tp [--quick] [--hidden 6144] [--vocab 200064]
#include <barrier>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#include "backend/cuda/cuda_backend.h"
#include "cuda_bench_util.h"

using namespace mxlm;
using namespace mxlm::cudabench;

namespace {

constexpr int kRanks = 2;

struct Rank {
  std::unique_ptr<backend::Backend> be;
  cudaStream_t stream = nullptr;
};

// Runs op(rank) `inner` times per rep on every rank (each on its own thread); returns rank 0's median device time
// per call (ms). Ranks start each rep together (barrier), so the time is the collective's, not a peer's lateness.
double time_collective(std::vector<Rank>& ranks, const std::function<void(int)>& op, int reps, int inner) {
  std::barrier sync(kRanks);
  std::vector<float> ts;
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r)
    threads.emplace_back([&, r] {
      Rank& rank = ranks[static_cast<size_t>(r)];
      CK(cudaSetDevice(r));
      cudaEvent_t a, b;
      CK(cudaEventCreate(&a));
      CK(cudaEventCreate(&b));
      for (int w = 0; w < 3; ++w) op(r);
      CK(cudaStreamSynchronize(rank.stream));
      for (int i = 0; i < reps; ++i) {
        sync.arrive_and_wait();
        CK(cudaEventRecord(a, rank.stream));
        for (int j = 0; j < inner; ++j) op(r);
        CK(cudaEventRecord(b, rank.stream));
        CK(cudaEventSynchronize(b));
        float ms = 0;
        CK(cudaEventElapsedTime(&ms, a, b));
        if (r == 0) ts.push_back(ms / static_cast<float>(inner));
      }
      cudaEventDestroy(a);
      cudaEventDestroy(b);
    });
  for (auto& t : threads) t.join();
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  size_t hidden = 6144, vocab = 200064;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    if (!std::strcmp(argv[i], "--hidden") && i + 1 < argc) hidden = std::stoul(argv[++i]);
    if (!std::strcmp(argv[i], "--vocab") && i + 1 < argc) vocab = std::stoul(argv[++i]);
  }
  const int devices = backend::cuda_device_count();
  if (devices < kRanks) {
    std::printf("skip: needs 2 GPUs (%d present)\n", devices);
    return 0;
  }
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %d x %s; NCCL_NVLS_ENABLE=%s\n", devices, prop.name,
              std::getenv("NCCL_NVLS_ENABLE") ? std::getenv("NCCL_NVLS_ENABLE") : "(unset: mxlm sets 0)");

  // Ceiling 1: peer copy bandwidth, GPU 0 -> GPU 1 (what one NVLink direction carries).
  {
    int can = 0;
    CK(cudaDeviceCanAccessPeer(&can, 0, 1));
    const size_t bytes = size_t{256} << 20;
    CK(cudaSetDevice(1));
    void* dst = dalloc(bytes);
    CK(cudaSetDevice(0));
    if (can) (void)cudaDeviceEnablePeerAccess(1, 0);
    (void)cudaGetLastError();
    void* src = dalloc(bytes);
    g_time_stream = nullptr;
    const double ms = time_ms([&](int) { CK(cudaMemcpyPeerAsync(dst, 1, src, 0, bytes)); }, quick ? 5 : 10);
    row("peer copy GPU0->GPU1 256 MiB: %.3f ms, %.0f GB/s (peer access %s)", ms, bytes / (ms * 1e-3) / 1e9,
        can ? "yes" : "no");
    CK(cudaFree(src));
    CK(cudaSetDevice(1));
    CK(cudaFree(dst));
    CK(cudaSetDevice(0));
  }

  auto group = backend::make_cuda_tp_group(kRanks);
  std::vector<Rank> ranks(kRanks);
  {
    std::vector<std::thread> t;
    for (int r = 0; r < kRanks; ++r)
      t.emplace_back([&, r] {
        backend::CudaOptions options;
        options.tp = group;
        options.tp_rank = r;
        ranks[static_cast<size_t>(r)].be = backend::make_cuda_backend(options);
        ranks[static_cast<size_t>(r)].stream = backend::cuda_stream(*ranks[static_cast<size_t>(r)].be);
      });
    for (auto& th : t) th.join();
  }
  const int reps = quick ? 5 : 15;

  // all_reduce_sum: bus bandwidth = 2 (n-1)/n * bytes / time (NCCL's convention: what each link carries).
  auto all_reduce = [&](size_t n, const char* label) {
    std::vector<std::unique_ptr<backend::Buffer>> bufs(kRanks);
    for (int r = 0; r < kRanks; ++r) {
      CK(cudaSetDevice(r));
      bufs[static_cast<size_t>(r)] = ranks[static_cast<size_t>(r)].be->alloc(n);
    }
    CK(cudaSetDevice(0));
    const int inner = n * 4 >= (size_t{64} << 20) ? 2 : 20;
    const double ms = time_collective(
        ranks, [&](int r) { ranks[static_cast<size_t>(r)].be->all_reduce_sum(bufs[static_cast<size_t>(r)]->f32(), n); },
        reps, inner);
    const double bytes = static_cast<double>(n) * 4;
    const double busbw = 2.0 * (kRanks - 1) / kRanks * bytes / (ms * 1e-3) / 1e9;
    row("all_reduce_sum %-26s %10zu floats: %8.2f us, bus %7.1f GB/s", label, n, ms * 1e3, busbw);
    for (int r = 0; r < kRanks; ++r) {  // freed on the rank's device (the pool caches it there)
      CK(cudaSetDevice(r));
      bufs[static_cast<size_t>(r)].reset();
    }
    CK(cudaSetDevice(0));
    return ms;
  };
  const double floor_ms = all_reduce(1, "(1 float: latency floor)");
  for (size_t rows : {size_t{1}, size_t{8}, size_t{32}, size_t{128}, size_t{512}, size_t{2048}, size_t{8192}}) {
    char label[64];
    std::snprintf(label, sizeof label, "[%zu, %zu]", rows, hidden);
    const double ms = all_reduce(rows * hidden, label);
    if (rows == 1) row("  -> decode step of one token: %.2fx the 1-float latency", ms / floor_ms);
  }
  all_reduce(size_t{64} << 20, "(256 MiB: bandwidth ceiling)");

  // all_gather_cols of the vocab-parallel logits: rows x vocab/2 per rank.
  for (size_t rows : {size_t{1}, size_t{32}, size_t{256}}) {
    const size_t cols = vocab / kRanks;
    std::vector<std::unique_ptr<backend::Buffer>> in(kRanks), out(kRanks);
    for (int r = 0; r < kRanks; ++r) {
      CK(cudaSetDevice(r));
      in[static_cast<size_t>(r)] = ranks[static_cast<size_t>(r)].be->alloc(rows * cols);
      out[static_cast<size_t>(r)] = ranks[static_cast<size_t>(r)].be->alloc(rows * cols * kRanks);
    }
    CK(cudaSetDevice(0));
    const double ms = time_collective(
        ranks,
        [&](int r) {
          ranks[static_cast<size_t>(r)].be->all_gather_cols(in[static_cast<size_t>(r)]->f32(), rows, cols,
                                                            out[static_cast<size_t>(r)]->f32());
        },
        reps, 10);
    const double bytes = static_cast<double>(rows * cols * kRanks) * 4;  // the gathered result
    row("all_gather_cols logits [%zu, %zu] per rank: %8.2f us, bus %7.1f GB/s", rows, cols, ms * 1e3,
        (kRanks - 1.0) / kRanks * bytes / (ms * 1e-3) / 1e9);
    for (int r = 0; r < kRanks; ++r) {
      CK(cudaSetDevice(r));
      in[static_cast<size_t>(r)].reset();
      out[static_cast<size_t>(r)].reset();
    }
    CK(cudaSetDevice(0));
  }

  {  // the backends go on their own devices
    std::vector<std::thread> t;
    for (int r = 0; r < kRanks; ++r) t.emplace_back([&, r] { ranks[static_cast<size_t>(r)].be.reset(); });
    for (auto& th : t) th.join();
  }
  print_summary(prop.name);
  return 0;
}
