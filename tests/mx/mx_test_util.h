// Independent formulations of the MXFP4 rules for the tests: brute-force nearest grid value in double with an
// explicit tie rule, and the scale exponent from frexp. None of this shares code with src/mx.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "mx/dispatch.h"
#include "mx/mxfp4.h"

namespace mxlm::mx::testing {

inline constexpr double kGrid[8] = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0};

// Nearest grid magnitude by exhaustive search; on a tie the even code (mantissa bit 0) wins. Values past
// 6 are nearest to 6 by construction (saturation).
inline uint8_t brute_magnitude_code(double a) {
  if (a > 8) a = 8;  // keeps the distances below exact in double; anything past 7 is nearest to 6 anyway
  int best = 0;
  double best_distance = INFINITY;
  for (int c = 0; c < 8; ++c) {
    const double d = std::fabs(a - kGrid[c]);
    if (d < best_distance || (d == best_distance && c % 2 == 0)) {
      best = c;
      best_distance = d;
    }
  }
  return static_cast<uint8_t>(best);
}

inline uint8_t brute_code(double y) {
  const uint8_t m = brute_magnitude_code(std::fabs(y));
  return static_cast<uint8_t>(m != 0 && std::signbit(y) ? m | 8 : m);
}

// Scale exponent from frexp: floor(log2 amax) - 2, plus one under the even rule when the significand is
// >= 1.75; clamped to [-127, 127]. Zero gives -127, Inf 127. Spec §3.2: a bump past the float32 range
// (amax >= 1.75 * 2^127) is Inf in Quark's bit arithmetic, hence 127.
inline int brute_exponent(double amax, ScaleRule rule) {
  if (amax == 0) return -127;
  if (std::isinf(amax)) return 127;
  int ex = 0;
  const double m = 2 * std::frexp(amax, &ex);  // amax = m * 2^(ex-1), m in [1, 2)
  int fl = ex - 1;
  if (rule == ScaleRule::Even && m >= 1.75) {
    ++fl;
    if (fl == 128) return 127;
  }
  const int e = fl - 2;
  return e < -127 ? -127 : (e > 127 ? 127 : e);
}

inline float as_f32(uint32_t bits) { return std::bit_cast<float>(bits); }
inline uint32_t bits_of(float f) { return std::bit_cast<uint32_t>(f); }
inline float widen_bf16(uint16_t b) { return as_f32(static_cast<uint32_t>(b) << 16); }

inline std::string isa_label(Isa isa) { return isa_name(isa); }

}  // namespace mxlm::mx::testing
