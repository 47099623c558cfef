// CPU feature checks shared by every runtime-dispatched kernel. __builtin_cpu_supports covers most
// features, but clang 14 does not know "f16c", so that one is read from CPUID directly.
#pragma once

namespace mxlm {

bool cpu_has_f16c();

}  // namespace mxlm
