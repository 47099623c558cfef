// Tensor parallelism of the CUDA backend over the GPUs of one process: one NCCL communicator per GPU
// (ncclCommInitAll), one CudaBackend per rank, each driven by its own host thread (as the CPU backend's TP group,
// cpu_tp_group.h: the model code is the same). The collectives are enqueued on the rank's stream like any other
// op, so they order with the kernels around them without host synchronisation.
#include <nccl.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend_impl.h"

namespace mxlm::backend {

class CudaTpGroup {
 public:
  explicit CudaTpGroup(int size) : comms_(static_cast<size_t>(size), nullptr) {
    std::vector<int> devices(static_cast<size_t>(size));
    for (int r = 0; r < size; ++r) devices[static_cast<size_t>(r)] = r;
    check(ncclCommInitAll(comms_.data(), size, devices.data()), "ncclCommInitAll");
  }
  ~CudaTpGroup() {
    if (aborted_) return;  // ncclCommAbort freed them
    for (ncclComm_t c : comms_)
      if (c) ncclCommDestroy(c);
  }
  CudaTpGroup(const CudaTpGroup&) = delete;
  CudaTpGroup& operator=(const CudaTpGroup&) = delete;

  int size() const { return static_cast<int>(comms_.size()); }
  int device(int rank) const { return rank; }
  // The rank's communicator; an Error once the group was aborted.
  ncclComm_t comm(int rank) const {
    if (aborted_) {
      std::lock_guard lock(mutex_);
      fail("tensor-parallel group aborted: {}", reason_);
    }
    return comms_[static_cast<size_t>(rank)];
  }
  // Backend::abort_collectives: ncclCommAbort on every rank's communicator makes the NCCL kernels that wait for the
  // failed rank return, so their ranks' host threads come back from their stream waits; the next collective fails.
  void abort(const std::string& reason) {
    std::lock_guard lock(mutex_);
    if (aborted_) return;
    reason_ = reason;
    aborted_ = true;
    for (ncclComm_t c : comms_)
      if (c) (void)ncclCommAbort(c);
  }

  static void check(ncclResult_t r, const char* what) {
    if (r != ncclSuccess) fail("NCCL error in {}: {} ({})", what, ncclGetErrorString(r), ncclGetLastError(nullptr));
  }

 private:
  std::vector<ncclComm_t> comms_;
  mutable std::mutex mutex_;
  std::atomic<bool> aborted_{false};
  std::string reason_;
};

std::shared_ptr<CudaTpGroup> make_cuda_tp_group(int size) {
  if (size < 1) fail("tensor-parallel group of {} ranks", size);
  const int n = cuda_device_count();
  if (n < size) fail("--tensor-parallel-size {} needs {} CUDA devices, {} present", size, size, n);
  // Before NCCL reads its environment. NVLink multicast (NVLS) stays off unless the environment asks for it: a
  // program using it can take the shared GPUs of a host out of service, and a group of a few ranks gains little.
  setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
  // Connect every algorithm at init, not lazily at a rank's first collective of a kind: lazy setup allocates
  // device memory in the middle of a step, while a peer thread may hold the driver in a blocking copy.
  setenv("NCCL_RUNTIME_CONNECT", "0", /*overwrite=*/0);
  int version = 0;
  CudaTpGroup::check(ncclGetVersion(&version), "ncclGetVersion");
  if (version < NCCL_VERSION(2, 12, 0))
    fail("NCCL {} is too old (the CUDA tensor-parallel ranks need 2.12 or newer)", version);
  return std::make_shared<CudaTpGroup>(size);
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

namespace cuda {

int tp_group_size(const CudaTpGroup& group) { return group.size(); }
int tp_group_device(const CudaTpGroup& group, int rank) { return group.device(rank); }

int CudaBackend::tp_size() const { return options_.tp ? options_.tp->size() : 1; }

void CudaBackend::abort_collectives(const std::string& reason) {
  if (options_.tp) options_.tp->abort(reason);
}

void CudaBackend::all_reduce_sum(float* x, size_t n) {
  if (!options_.tp || options_.tp->size() == 1 || n == 0) return;
  // Every rank gets the same bits: NCCL reduces each element once and broadcasts it (ring and tree alike).
  CudaTpGroup::check(ncclAllReduce(x, x, n, ncclFloat32, ncclSum, options_.tp->comm(options_.tp_rank), stream_),
                     "ncclAllReduce");
}

void CudaBackend::all_gather_cols(const float* x, size_t rows, size_t cols_per_rank, float* out) {
  const size_t chunk = rows * cols_per_rank;
  if (chunk == 0) return;
  const int size = tp_size();
  if (size == 1) {
    copy(x, out, chunk);
    return;
  }
  const ncclComm_t comm = options_.tp->comm(options_.tp_rank);
  if (rows == 1) {  // rank-major is already the column concatenation
    CudaTpGroup::check(ncclAllGather(x, out, chunk, ncclFloat32, comm, stream_), "ncclAllGather");
    return;
  }
  // NCCL gathers rank-major ([rank, rows, cols_per_rank]); the column concatenation is one strided 2D copy per
  // rank into its column band of out.
  Block gathered(pool_, chunk * static_cast<size_t>(size) * sizeof(float));
  CudaTpGroup::check(ncclAllGather(x, gathered.as<float>(), chunk, ncclFloat32, comm, stream_), "ncclAllGather");
  const size_t band = cols_per_rank * sizeof(float);
  for (int r = 0; r < size; ++r)
    MXLM_CUDA_CHECK(cudaMemcpy2DAsync(out + static_cast<size_t>(r) * cols_per_rank, band * static_cast<size_t>(size),
                                      gathered.as<float>() + static_cast<size_t>(r) * chunk, band, band, rows,
                                      cudaMemcpyDeviceToDevice, stream_));
}

}  // namespace cuda
}  // namespace mxlm::backend
