// Internal to the CPU backend: which vector code the attention ops (dense, sparse, the indexer's scores) use,
// and a hook that forces one so the tests can run every variant this CPU supports.
#pragma once

namespace mxlm::backend::cpu {

enum class AttentionIsa { Avx512, Avx2, Baseline };

bool attention_isa_supported(AttentionIsa isa);
// The variant in use now: the forced one if set, else the best this CPU supports.
AttentionIsa attention_active_isa();
// Forces `isa` for every later call in this process; an ISA the CPU lacks is an mxlm::Error.
void attention_force_isa(AttentionIsa isa);
void attention_reset_isa();

}  // namespace mxlm::backend::cpu
