#include "engine/tp_ranks.h"

#include <pthread.h>

#include <fmt/format.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>

#include "core/error.h"
#include "engine/model_runner.h"

namespace mxlm::engine {

// One rank r >= 1: a thread that runs the jobs posted to it, one at a time, and owns the rank's objects.
struct TpRanks::Rank {
  int index = 0;
  std::unique_ptr<backend::Backend> backend;
  std::unique_ptr<model::M3Model> model;
  std::unique_ptr<ModelRunner> runner;

  std::mutex mutex;
  std::condition_variable cv;
  std::function<void(Rank&)> job;  // pending or running
  bool stop = false;
  std::exception_ptr error;
  std::thread thread;

  void loop() {
    std::unique_lock lock(mutex);
    for (;;) {
      cv.wait(lock, [&] { return stop || job; });
      if (!job) break;  // stop, with nothing left to run
      lock.unlock();
      std::exception_ptr e;
      try {
        job(*this);
      } catch (const std::exception& ex) {
        e = std::current_exception();
        // Peers blocked in a collective that this rank will never reach would wait forever.
        if (backend) backend->abort_collectives(fmt::format("rank {} failed: {}", index, ex.what()));
      } catch (...) {
        e = std::current_exception();
        if (backend) backend->abort_collectives(fmt::format("rank {} failed", index));
      }
      lock.lock();
      if (e && !error) error = e;
      job = nullptr;
      cv.notify_all();
    }
    lock.unlock();
    // The rank's objects go on the thread that made them (a GPU backend's device is current here).
    runner.reset();
    model.reset();
    backend.reset();
  }
};

namespace {
// The tests' way to show that the other ranks return an error instead of waiting for a failed rank forever.
TpRanks::InjectedFailure injected_failure() {
  TpRanks::InjectedFailure f;
  if (const char* v = std::getenv("MXLM_TP_INJECT_FAILURE")) {
    if (std::sscanf(v, "%d:%ld", &f.rank, &f.step) != 2) fail("MXLM_TP_INJECT_FAILURE={}: expected RANK:STEP", v);
  }
  return f;
}
}  // namespace

TpRanks::TpRanks(int size, MakeBackend make_backend, LoadModel load_model) {
  fault_ = injected_failure();
  if (size < 2) fail("a tensor-parallel group of {} ranks needs no rank threads", size);
  for (int r = 1; r < size; ++r) {
    ranks_.push_back(std::make_unique<Rank>());
    Rank& rank = *ranks_.back();
    rank.index = r;
    rank.job = [make_backend, load_model](Rank& self) {
      self.backend = make_backend(self.index);
      self.model = load_model(*self.backend, self.index);
    };
    // Rank threads never take the process's termination signals: those belong to the application's threads.
    sigset_t block, old;
    sigemptyset(&block);
    for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT}) sigaddset(&block, sig);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    rank.thread = std::thread([&rank] { rank.loop(); });
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
  }
}

TpRanks::~TpRanks() {
  for (auto& r : ranks_) {
    {
      std::lock_guard lock(r->mutex);
      r->stop = true;
    }
    r->cv.notify_all();
  }
  for (auto& r : ranks_)
    if (r->thread.joinable()) r->thread.join();
}

void TpRanks::post(const std::function<void(Rank&)>& job) {
  for (auto& r : ranks_) {
    {
      std::lock_guard lock(r->mutex);
      r->job = job;
    }
    r->cv.notify_all();
  }
}

void TpRanks::wait_all() {
  std::exception_ptr first;
  for (auto& r : ranks_) {
    std::unique_lock lock(r->mutex);
    r->cv.wait(lock, [&] { return !r->job; });
    if (r->error && !first) first = r->error;
    r->error = nullptr;
  }
  if (first) std::rethrow_exception(first);
}

void TpRanks::attach(ModelRunner& runner) {
  wait_all();  // the loads
  const CacheConfig cache = runner.cache_config();
  post([cache](Rank& self) { self.runner = std::make_unique<ModelRunner>(*self.model, cache); });
  wait_all();
  runner.set_tp_ranks(this);
}

void TpRanks::begin_forward(const model::ForwardBatch& batch) {
  const long step = forwards_++;
  post([&batch, step, fault = fault_](Rank& self) {
    if (self.index == fault.rank && step == fault.step)
      fail("injected failure of rank {} at forward {} (MXLM_TP_INJECT_FAILURE)", self.index, step);
    self.runner->peer_forward(batch);
  });
}

void TpRanks::end_forward() { wait_all(); }

}  // namespace mxlm::engine
