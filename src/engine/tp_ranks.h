// Tensor parallelism over threads of one process, for any backend whose ranks meet in collectives (the CPU
// backend's thread group, cpu_tp_group.h; the CUDA backend's NCCL group, one GPU per rank). Rank 0 is the caller's
// backend, model and ModelRunner; ranks 1 .. size-1 each live on a thread of their own with their own backend,
// model and KV cache, and run every forward of rank 0's runner with the same batch. The scheduler, the CLI and the
// server drive rank 0's ModelRunner exactly as at TP = 1: block tables, prefix caching and sampling happen once, on
// rank 0, and every rank's cache has the same pages.
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "backend/backend.h"
#include "model/m3_model.h"

namespace mxlm::engine {

class ModelRunner;
struct CacheConfig;

class TpRanks {
 public:
  // Called on rank r's own thread (a GPU backend binds its device to the thread that constructs it).
  using MakeBackend = std::function<std::unique_ptr<backend::Backend>(int rank)>;
  using LoadModel = std::function<std::unique_ptr<model::M3Model>(backend::Backend& backend, int rank)>;

  // Starts ranks 1 .. size-1: each makes its backend and loads its model on its own thread, while the caller loads
  // rank 0. size >= 2.
  TpRanks(int size, MakeBackend make_backend, LoadModel load_model);
  // Stops the threads; each rank's runner, model and backend are destroyed on the rank's own thread.
  ~TpRanks();
  TpRanks(const TpRanks&) = delete;
  TpRanks& operator=(const TpRanks&) = delete;

  int size() const { return static_cast<int>(ranks_.size()) + 1; }

  // A fault for tests, read from MXLM_TP_INJECT_FAILURE=RANK:STEP at construction: rank RANK (>= 1) fails its forward
  // number STEP (0-based) as a GPU running out of memory in the middle of a step would.
  struct InjectedFailure {
    int rank = -1;
    long step = -1;
  };

  // Waits until ranks 1.. are loaded (rethrowing the first load error), gives each a KV cache of runner's
  // configuration and makes every runner.step() run on all ranks. Call once rank 0's model is loaded, before the
  // first step; the runner must not outlive this object.
  void attach(ModelRunner& runner);

  // ModelRunner::step's side: every other rank starts the forward of `batch` (which must stay alive until
  // end_forward), then end_forward waits for them and rethrows the first rank's error. A rank that fails aborts the
  // group's collectives (Backend::abort_collectives), so the others return with an error instead of waiting for it;
  // every later step then fails at once.
  void begin_forward(const model::ForwardBatch& batch);
  void end_forward();

 private:
  struct Rank;
  void post(const std::function<void(Rank&)>& job);  // to every rank 1..
  void wait_all();                                   // rethrows the first error

  std::vector<std::unique_ptr<Rank>> ranks_;
  long forwards_ = 0;
  InjectedFailure fault_;
};

}  // namespace mxlm::engine
