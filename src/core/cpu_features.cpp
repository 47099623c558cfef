#include "core/cpu_features.h"

#include <cpuid.h>

namespace mxlm {

bool cpu_has_f16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 29)) != 0;  // leaf 1, ECX bit 29
}

}  // namespace mxlm
