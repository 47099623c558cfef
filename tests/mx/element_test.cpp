// E2M1 / E8M0 codecs, the scale rules and element rounding, exhaustively over bf16 bit patterns.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/error.h"
#include "mx/dispatch.h"
#include "mx/mxfp4.h"
#include "mx_test_util.h"

namespace mxlm::mx {
namespace {

using namespace testing;

TEST(MxE2M1, ValueTable) {
  const float expected[16] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -0.5f, -1, -1.5f, -2, -3, -4, -6};
  for (uint8_t c = 0; c < 16; ++c) EXPECT_EQ(bits_of(e2m1_value(c)), bits_of(expected[c])) << int(c);
  EXPECT_TRUE(std::signbit(e2m1_value(8)));
  EXPECT_THROW(e2m1_value(16), Error);
}

TEST(MxE2M1, EncodeDecodeRoundTripsEveryCode) {
  for (uint8_t c = 0; c < 16; ++c) {
    const uint8_t expected = c == 8 ? 0 : c;  // -0 encodes as code 0 (Quark never writes code 8)
    EXPECT_EQ(e2m1_encode(e2m1_value(c)), expected) << int(c);
  }
}

TEST(MxE2M1, TiesGoToEvenAndSaturate) {
  const float ties[] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f, 7.0f};
  const uint8_t codes[] = {0, 2, 2, 4, 4, 6, 6, 7};
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(e2m1_encode(ties[i]), codes[i]) << ties[i];
    EXPECT_EQ(e2m1_encode(-ties[i]), codes[i] == 0 ? 0 : codes[i] | 8) << -ties[i];
  }
  EXPECT_EQ(e2m1_encode(std::nextafter(0.25f, 1.0f)), 1);
  EXPECT_EQ(e2m1_encode(std::nextafter(0.75f, 0.0f)), 1);
  EXPECT_EQ(e2m1_encode(1e30f), 7);
  EXPECT_EQ(e2m1_encode(-6.5f), 15);
  EXPECT_EQ(e2m1_encode(INFINITY), 7);
  EXPECT_EQ(e2m1_encode(-INFINITY), 15);
  EXPECT_EQ(e2m1_encode(std::nanf("")), 7);  // documented: NaN saturates by its sign bit
  EXPECT_EQ(e2m1_encode(-std::nanf("")), 15);
}

// Every bf16 bit pattern (all finite values, both zeros, subnormals, Inf) against brute-force nearest.
TEST(MxE2M1, EncodeMatchesBruteForceOnEveryBf16Pattern) {
  int checked = 0;
  for (uint32_t b = 0; b < 65536; ++b) {
    const float y = widen_bf16(static_cast<uint16_t>(b));
    if (std::isnan(y)) continue;
    ASSERT_EQ(e2m1_encode(y), brute_code(y)) << "bf16 0x" << std::hex << b << " = " << y;
    ++checked;
  }
  EXPECT_EQ(checked, 65536 - 254);
}

TEST(MxE8M0, DecodeEncode) {
  EXPECT_EQ(e8m0_value(127), 1.0f);
  EXPECT_EQ(e8m0_value(128), 2.0f);
  EXPECT_EQ(e8m0_value(125), 0.25f);
  EXPECT_EQ(e8m0_value(254), std::ldexp(1.0f, 127));
  EXPECT_EQ(e8m0_value(1), std::ldexp(1.0f, -126));
  EXPECT_EQ(bits_of(e8m0_value(0)), 0x00400000u);  // 2^-127, subnormal
  EXPECT_TRUE(std::isnan(e8m0_value(255)));
  for (int b = 0; b < 255; ++b) {
    EXPECT_EQ(e8m0_value(static_cast<uint8_t>(b)), std::ldexp(1.0f, b - 127)) << b;
    EXPECT_EQ(e8m0_encode(b - 127), b);
  }
  EXPECT_THROW(e8m0_encode(128), Error);
  EXPECT_THROW(e8m0_encode(-128), Error);
  EXPECT_EQ(export_scale_byte(-127), 1);
  EXPECT_EQ(export_scale_byte(-126), 1);
  EXPECT_EQ(export_scale_byte(0), 127);
  EXPECT_EQ(export_scale_byte(127), 254);
}

TEST(MxScaleExponent, MatchesFrexpFormulationOnEveryBf16Magnitude) {
  for (ScaleRule rule : {ScaleRule::Even, ScaleRule::Floor}) {
    for (uint32_t b = 0; b <= 0x7f80; ++b) {  // +0 .. +Inf
      const float amax = widen_bf16(static_cast<uint16_t>(b));
      ASSERT_EQ(scale_exponent(amax, rule), brute_exponent(amax, rule)) << "bf16 0x" << std::hex << b;
    }
  }
}

TEST(MxScaleExponent, EdgeCases) {
  EXPECT_EQ(scale_exponent(0.0f, ScaleRule::Even), -127);
  EXPECT_EQ(scale_exponent(6.0f, ScaleRule::Even), 0);
  EXPECT_EQ(scale_exponent(6.96875f, ScaleRule::Even), 0);
  EXPECT_EQ(scale_exponent(7.0f, ScaleRule::Even), 1);  // 1.75 * 4: the even bump
  EXPECT_EQ(scale_exponent(7.0f, ScaleRule::Floor), 0);
  EXPECT_EQ(scale_exponent(std::nextafter(7.0f, 0.0f), ScaleRule::Even), 0);
  EXPECT_EQ(scale_exponent(INFINITY, ScaleRule::Even), 127);
  EXPECT_EQ(scale_exponent(INFINITY, ScaleRule::Floor), 127);
  EXPECT_EQ(scale_exponent(std::numeric_limits<float>::max(), ScaleRule::Even), 127);  // carry into Inf
  EXPECT_EQ(scale_exponent(std::numeric_limits<float>::max(), ScaleRule::Floor), 125);
  EXPECT_EQ(scale_exponent(std::numeric_limits<float>::denorm_min(), ScaleRule::Even), -127);
  EXPECT_EQ(scale_exponent(std::ldexp(1.0f, -124), ScaleRule::Floor), -126);
  EXPECT_THROW(scale_exponent(std::nanf(""), ScaleRule::Even), Error);
  EXPECT_THROW(scale_exponent(-1.0f, ScaleRule::Even), Error);
}

// Random float32 magnitudes (not only bf16 ones) against the frexp formulation.
TEST(MxScaleExponent, MatchesFrexpFormulationOnRandomF32) {
  uint32_t state = 12345;
  for (int i = 0; i < 200000; ++i) {
    state = state * 1664525u + 1013904223u;
    const float amax = as_f32(state & 0x7fffffffu);
    if (std::isnan(amax)) continue;
    for (ScaleRule rule : {ScaleRule::Even, ScaleRule::Floor})
      ASSERT_EQ(scale_exponent(amax, rule), brute_exponent(amax, rule)) << std::hex << bits_of(amax);
  }
}

// Every bf16 magnitude up to a companion that pins the scale to 2^0 goes through every ISA's block
// kernels (quantize codes and QDQ values) and must match brute-force rounding.
TEST(MxElementRounding, EveryIsaMatchesBruteForceOnEveryBf16Value) {
  struct Case {
    ScaleRule rule;
    uint16_t companion;  // largest |x| with e = 0 under the rule
  };
  for (const Case& c : {Case{ScaleRule::Even, 0x40df /* 6.96875 */}, Case{ScaleRule::Floor, 0x40ff /* 7.96875 */}}) {
    ASSERT_EQ(scale_exponent(widen_bf16(c.companion), c.rule), 0);
    std::vector<uint16_t> values;
    for (uint32_t b = 0; b <= c.companion; ++b) {
      values.push_back(static_cast<uint16_t>(b));
      values.push_back(static_cast<uint16_t>(b | 0x8000));
    }
    // Blocks: companion first, then 31 test values.
    std::vector<uint16_t> x;
    for (size_t i = 0; i < values.size(); i += 31) {
      x.push_back(c.companion);
      for (size_t j = 0; j < 31; ++j) x.push_back(values[std::min(i + j, values.size() - 1)]);
    }
    const size_t n = x.size(), blocks = n / 32;
    std::vector<float> xf(n);
    for (size_t i = 0; i < n; ++i) xf[i] = widen_bf16(x[i]);
    for (Isa isa : supported_isas()) {
      ScopedIsa scoped(isa);
      std::vector<uint8_t> packed(n / 2), scales(blocks), packed_f32(n / 2), scales_f32(blocks);
      quantize_bf16(x.data(), 1, n, packed.data(), scales.data(), c.rule);
      quantize_f32(xf.data(), 1, n, packed_f32.data(), scales_f32.data(), c.rule);
      std::vector<uint16_t> q = x;
      qdq_bf16(q.data(), n, c.rule);
      std::vector<float> qf = xf;
      qdq_f32(qf.data(), n, c.rule);
      for (size_t i = 0; i < n; ++i) {
        const float y = xf[i];
        const uint8_t expected = brute_code(y);
        const uint8_t code = (i % 2 == 0) ? packed[i / 2] & 15 : packed[i / 2] >> 4;
        ASSERT_EQ(code, expected) << isa_name(isa) << " bf16 0x" << std::hex << x[i];
        ASSERT_EQ(packed[i / 2], packed_f32[i / 2]) << isa_name(isa);
        const float value = std::copysign(static_cast<float>(kGrid[expected & 7]), y);  // sign of zero kept
        ASSERT_EQ(bits_of(widen_bf16(q[i])), bits_of(value)) << isa_name(isa) << " bf16 0x" << std::hex << x[i];
        ASSERT_EQ(bits_of(qf[i]), bits_of(value)) << isa_name(isa) << " bf16 0x" << std::hex << x[i];
      }
      for (size_t b = 0; b < blocks; ++b) {
        ASSERT_EQ(scales[b], 127);
        ASSERT_EQ(scales_f32[b], 127);
      }
    }
  }
}

TEST(MxDispatch, AllIsasOfThisMachineAreTestable) {
  const auto isas = supported_isas();
  ASSERT_FALSE(isas.empty());
  EXPECT_EQ(isas.front(), Isa::Scalar);
  EXPECT_EQ(std::string(active_isa()), isa_name(isas.back()));
  // The dev VM and CI machines have AVX-512; make a silent fallback to scalar visible.
  if (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    EXPECT_EQ(isas.size(), 3u);
  }
  {
    ScopedIsa scoped(Isa::Scalar);
    EXPECT_EQ(current_isa(), Isa::Scalar);
    EXPECT_STREQ(active_isa(), "scalar");
  }
  EXPECT_EQ(current_isa(), isas.back());
}

}  // namespace
}  // namespace mxlm::mx
