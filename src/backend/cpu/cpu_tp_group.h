// Tensor parallelism on the CPU: the ranks are threads of one process, each with its own CpuBackend, and the
// collectives meet at a barrier. This runs the TP sharding of the model on a machine without GPUs, so the
// sharding rules are tested where CI runs; a GPU backend implements the same collectives with NCCL.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend/backend.h"

namespace mxlm::backend::cpu {

class CpuTpGroup {
 public:
  explicit CpuTpGroup(int size);
  int size() const { return size_; }
  // Every rank must call these in the same order with the same sizes (as with NCCL).
  void all_reduce_sum(int rank, float* x, size_t n);
  void all_gather_cols(int rank, const float* x, size_t rows, size_t cols_per_rank, float* out);
  // Backend::abort_collectives: ranks waiting in a collective, and every later collective, throw an Error with
  // `reason` (a failed rank never arrives; without this its peers would wait forever).
  void abort(const std::string& reason);

 private:
  void arrive_and_wait();  // a barrier of all ranks that an abort breaks

  int size_;
  std::mutex mutex_;
  std::condition_variable cv_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  bool aborted_ = false;
  std::string reason_;
  std::vector<const float*> posted_;
};

// One backend per rank of a new group of `size` ranks; rank r must be driven by its own thread.
std::vector<std::unique_ptr<Backend>> make_cpu_tp_backends(int size);

}  // namespace mxlm::backend::cpu
