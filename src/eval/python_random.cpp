#include "eval/python_random.h"

#include <bit>
#include <cmath>
#include <unordered_set>

#include "core/error.h"

namespace mxlm::eval {

namespace {
constexpr int kM = 397;
constexpr uint32_t kMatrixA = 0x9908b0dfu;
constexpr uint32_t kUpperMask = 0x80000000u;
constexpr uint32_t kLowerMask = 0x7fffffffu;
}  // namespace

PythonRandom::PythonRandom(uint64_t seed) {
  // CPython splits abs(seed) into 32-bit words, least significant first, and always keeps at least one.
  std::vector<uint32_t> key{static_cast<uint32_t>(seed)};
  if (seed >> 32) key.push_back(static_cast<uint32_t>(seed >> 32));
  init_by_array(key);
}

void PythonRandom::init_genrand(uint32_t s) {
  mt_[0] = s;
  for (int i = 1; i < kN; ++i) mt_[i] = 1812433253u * (mt_[i - 1] ^ (mt_[i - 1] >> 30)) + static_cast<uint32_t>(i);
  index_ = kN;
}

void PythonRandom::init_by_array(const std::vector<uint32_t>& key) {
  init_genrand(19650218u);
  int i = 1;
  size_t j = 0;
  for (size_t k = std::max<size_t>(kN, key.size()); k > 0; --k) {
    mt_[i] = (mt_[i] ^ ((mt_[i - 1] ^ (mt_[i - 1] >> 30)) * 1664525u)) + key[j] + static_cast<uint32_t>(j);
    ++i;
    ++j;
    if (i >= kN) {
      mt_[0] = mt_[kN - 1];
      i = 1;
    }
    if (j >= key.size()) j = 0;
  }
  for (int k = kN - 1; k > 0; --k) {
    mt_[i] = (mt_[i] ^ ((mt_[i - 1] ^ (mt_[i - 1] >> 30)) * 1566083941u)) - static_cast<uint32_t>(i);
    ++i;
    if (i >= kN) {
      mt_[0] = mt_[kN - 1];
      i = 1;
    }
  }
  mt_[0] = 0x80000000u;  // guarantees a non-zero initial state
  index_ = kN;
}

uint32_t PythonRandom::next_u32() {
  if (index_ >= kN) {
    int k = 0;
    for (; k < kN - kM; ++k) {
      const uint32_t y = (mt_[k] & kUpperMask) | (mt_[k + 1] & kLowerMask);
      mt_[k] = mt_[k + kM] ^ (y >> 1) ^ ((y & 1u) ? kMatrixA : 0u);
    }
    for (; k < kN - 1; ++k) {
      const uint32_t y = (mt_[k] & kUpperMask) | (mt_[k + 1] & kLowerMask);
      mt_[k] = mt_[k + (kM - kN)] ^ (y >> 1) ^ ((y & 1u) ? kMatrixA : 0u);
    }
    const uint32_t y = (mt_[kN - 1] & kUpperMask) | (mt_[0] & kLowerMask);
    mt_[kN - 1] = mt_[kM - 1] ^ (y >> 1) ^ ((y & 1u) ? kMatrixA : 0u);
    index_ = 0;
  }
  uint32_t y = mt_[index_++];
  y ^= y >> 11;
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  y ^= y >> 18;
  return y;
}

uint64_t PythonRandom::getrandbits(int k) {
  if (k < 0 || k > 64) fail("getrandbits: k must be in [0, 64], got {}", k);
  if (k == 0) return 0;
  if (k <= 32) return next_u32() >> (32 - k);
  // Wider values are filled from the least significant 32-bit word up; the last word keeps its top bits.
  const uint64_t low = next_u32();
  const uint64_t high = next_u32() >> (64 - k);
  return low | (high << 32);
}

uint64_t PythonRandom::randbelow(uint64_t n) {
  if (n == 0) fail("randbelow: n must be positive");
  const int k = std::bit_width(n);  // n.bit_length(), not (n-1): CPython draws one bit too many for powers of 2
  uint64_t r = getrandbits(k);
  while (r >= n) r = getrandbits(k);
  return r;
}

std::vector<size_t> PythonRandom::sample(size_t population, size_t k) {
  if (k > population) fail("sample: sample larger than population ({} > {})", k, population);
  std::vector<size_t> result(k);
  size_t setsize = 21;  // CPython's bound below which copying the pool beats a set of picks
  if (k > 5) setsize += static_cast<size_t>(std::pow(4.0, std::ceil(std::log(static_cast<double>(k * 3)) / std::log(4.0))));
  if (population <= setsize) {
    std::vector<size_t> pool(population);
    for (size_t i = 0; i < population; ++i) pool[i] = i;
    for (size_t i = 0; i < k; ++i) {
      const size_t j = randbelow(population - i);
      result[i] = pool[j];
      pool[j] = pool[population - i - 1];
    }
  } else {
    std::unordered_set<size_t> selected;
    for (size_t i = 0; i < k; ++i) {
      size_t j = randbelow(population);
      while (selected.count(j)) j = randbelow(population);
      selected.insert(j);
      result[i] = j;
    }
  }
  return result;
}

}  // namespace mxlm::eval
