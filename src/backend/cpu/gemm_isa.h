// Internal to the CPU backend: which instruction set the dispatched GEMM kernels use, and a hook that
// forces one so the tests can run every implementation this CPU supports against the reference.
#pragma once

namespace mxlm::cpu {

enum class GemmIsa { Scalar, Avx2, Avx512 };

// The best implementation this CPU supports (checked once with __builtin_cpu_supports).
GemmIsa gemm_best_isa();
// The implementation the dispatched kernels use now: the forced one if set, else the best.
GemmIsa gemm_active_isa();
// Forces `isa` for every later call in this process; an ISA the CPU lacks is an mxlm::Error.
void gemm_force_isa(GemmIsa isa);
// Back to the best supported implementation.
void gemm_reset_isa();
bool gemm_isa_supported(GemmIsa isa);
const char* gemm_isa_name(GemmIsa isa);

}  // namespace mxlm::cpu
