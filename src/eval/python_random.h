// CPython's `random.Random`, bit for bit, for the few-shot draws lm-eval makes: MT19937 seeded the way
// CPython seeds from an int (init_by_array over its 32-bit words), `getrandbits`, `_randbelow` (rejection
// sampling on bit_length(n) bits) and `sample` (both the pool branch and the set branch).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace mxlm::eval {

class PythonRandom {
 public:
  // Equivalent to `random.Random(seed)` for a non-negative int seed.
  explicit PythonRandom(uint64_t seed);

  // One tempered 32-bit MT19937 output (CPython's genrand_uint32).
  uint32_t next_u32();
  // `getrandbits(k)` for 0 <= k <= 64.
  uint64_t getrandbits(int k);
  // `_randbelow(n)` for n >= 1: uniform in [0, n).
  uint64_t randbelow(uint64_t n);
  // `sample(range(population), k)`: k distinct indices in CPython's order. Throws mxlm::Error if k > population.
  std::vector<size_t> sample(size_t population, size_t k);

 private:
  void init_genrand(uint32_t s);
  void init_by_array(const std::vector<uint32_t>& key);

  static constexpr int kN = 624;
  std::array<uint32_t, kN> mt_{};
  int index_ = kN + 1;
};

}  // namespace mxlm::eval
