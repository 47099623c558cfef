// Which instruction set the dispatched mx:: functions use. The best one this CPU supports is picked on
// first use; tests and benchmarks can force another so that every path runs on one machine.
#pragma once

#include <vector>

namespace mxlm::mx {

enum class Isa { Scalar, Avx2, Avx512 };

const char* isa_name(Isa isa);
// Whether `isa` is compiled in and this CPU (and OS) supports it. Scalar always is.
bool isa_supported(Isa isa);
// Every supported ISA, Scalar first.
std::vector<Isa> supported_isas();
// The ISA the dispatched functions use now.
Isa current_isa();
// Makes the dispatched functions use `isa` (an error if unsupported). Not synchronised with calls running
// on other threads: for tests and benchmarks.
void force_isa(Isa isa);
// Back to the best supported ISA.
void reset_isa();

// Forces an ISA for the lifetime of the object.
class ScopedIsa {
 public:
  explicit ScopedIsa(Isa isa) { force_isa(isa); }
  ~ScopedIsa() { reset_isa(); }
  ScopedIsa(const ScopedIsa&) = delete;
  ScopedIsa& operator=(const ScopedIsa&) = delete;
};

}  // namespace mxlm::mx
