#include "backend/cpu/cpu_tp_group.h"

#include <cstring>

#include "backend/cpu/cpu_backend.h"
#include "core/error.h"

namespace mxlm::backend::cpu {

CpuTpGroup::CpuTpGroup(int size) : size_(size), posted_(static_cast<size_t>(size), nullptr) {
  if (size < 1) fail("tensor-parallel group of {} ranks", size);
}

void CpuTpGroup::arrive_and_wait() {
  std::unique_lock lock(mutex_);
  if (aborted_) fail("tensor-parallel group aborted: {}", reason_);
  const uint64_t generation = generation_;
  if (++arrived_ == size_) {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
    return;
  }
  cv_.wait(lock, [&] { return generation_ != generation || aborted_; });
  if (generation_ == generation) fail("tensor-parallel group aborted: {}", reason_);
}

void CpuTpGroup::abort(const std::string& reason) {
  std::lock_guard lock(mutex_);
  if (aborted_) return;
  aborted_ = true;
  reason_ = reason;
  cv_.notify_all();
}

void CpuTpGroup::all_reduce_sum(int rank, float* x, size_t n) {
  posted_[static_cast<size_t>(rank)] = x;
  arrive_and_wait();
  // Every rank sums in rank order, so all ranks get bit-identical results.
  std::vector<float> sum(posted_[0], posted_[0] + n);
  for (int r = 1; r < size_; ++r)
    for (size_t i = 0; i < n; ++i) sum[i] += posted_[static_cast<size_t>(r)][i];
  arrive_and_wait();  // nobody overwrites its input while another rank still reads it
  std::memcpy(x, sum.data(), n * sizeof(float));
  arrive_and_wait();
}

void CpuTpGroup::all_gather_cols(int rank, const float* x, size_t rows, size_t cols_per_rank, float* out) {
  posted_[static_cast<size_t>(rank)] = x;
  arrive_and_wait();
  const size_t cols = cols_per_rank * static_cast<size_t>(size_);
  for (int r = 0; r < size_; ++r)
    for (size_t row = 0; row < rows; ++row)
      std::memcpy(out + row * cols + static_cast<size_t>(r) * cols_per_rank,
                  posted_[static_cast<size_t>(r)] + row * cols_per_rank, cols_per_rank * sizeof(float));
  arrive_and_wait();
}

std::vector<std::unique_ptr<Backend>> make_cpu_tp_backends(int size) {
  auto group = std::make_shared<CpuTpGroup>(size);
  std::vector<std::unique_ptr<Backend>> out;
  for (int r = 0; r < size; ++r) out.push_back(std::make_unique<CpuBackend>(group, r));
  return out;
}

}  // namespace mxlm::backend::cpu
