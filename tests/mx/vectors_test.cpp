// The worked vectors of shared/spec/mxfp4_numerics.md §9 (copied here; columns Q = Quark/vLLM, F = OCP floor
// scale with RNE elements), on every ISA: scale bytes, codes, packed bytes, dequantized values and QDQ.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "mx/dispatch.h"
#include "mx/mxfp4.h"
#include "mx_test_util.h"

namespace mxlm::mx {
namespace {

using namespace testing;

struct Expected {
  uint8_t scale_byte;
  std::string codes;           // hex digits, element 0 first; unlisted elements are code 0
  std::vector<float> dequant;  // leading values; the rest are 0
};

struct Vector {
  const char* name;
  std::vector<float> x;  // leading values; the rest are 0
  Expected q, f;
  std::vector<uint8_t> q_packed;  // leading bytes; the rest are 0
};

std::vector<float> block_of(const std::vector<float>& head) {
  std::vector<float> b(32, 0.0f);
  for (size_t i = 0; i < head.size(); ++i) b[i] = head[i];
  return b;
}

const std::vector<Vector>& spec_vectors() {
  static const std::vector<Vector> v = {
      {"A",
       {0,    .25,   .5,   .75,  1,  1.25, 1.5,  1.75,  2,    2.5, 3,   3.5,  4,    5,     6,     -.25,
        -.75, -1.25, -2.5, -3.5, -5, -6,   .125, -.125, 2.75, 4.5, 5.5, -4.5, .375, -.375, 1.125, -1.875},
       {127, "0012223444566670AACEEF00567E192C", {}},
       {127, "0012223444566670AACEEF00567E192C", {}},
       {0x00, 0x21, 0x22, 0x43, 0x44, 0x65, 0x66, 0x07, 0xAA, 0xEC, 0xFE, 0x00, 0x65, 0xE7, 0x91, 0xC2}},
      {"B",
       {7, -7, 3, 1, 0.5, 0.75, 6.5},
       {128, "6E31015", {8, -8, 3, 1, 0, 1, 6}},
       {127, "7F52127", {6, -6, 3, 1, 0.5, 1, 6}},
       {0xE6, 0x13, 0x10, 0x05}},
      {"C1", {1.71875, 0.5, -0.4375}, {125, "74C", {1.5, 0.5, -0.5}}, {125, "74C", {1.5, 0.5, -0.5}}, {0x47, 0x0C}},
      {"C2", {1.75, 0.5, -0.4375}, {126, "62A", {2.0, 0.5, -0.5}}, {125, "74C", {1.5, 0.5, -0.5}}, {0x26, 0x0A}},
      // D: all zeros. The spec's byte is 0 (older Quark, OCP); current Quark's exporter writes 1, as we do.
      {"D", {}, {1, "", {}}, {1, "", {}}, {}},
      {"E", {448, -100, 3, 64}, {134, "6A01", {512, -128, 0, 64}}, {133, "7B02", {384, -96, 0, 64}}, {0xA6, 0x10}},
      {"F",
       {0x1p-10f, -0x1p-12f, 3 * 0x1p-13f},
       {115, "6A3", {0x1p-10f, -0x1p-12f, 1.5f * 0x1p-12f}},
       {115, "6A3", {0x1p-10f, -0x1p-12f, 1.5f * 0x1p-12f}},
       {0xA6, 0x03}},
      {"G", {-0.0f, -0.1015625f, 0.0f}, {121, "0F0", {0, -0.09375f}}, {121, "0F0", {0, -0.09375f}}, {0xF0}},
  };
  return v;
}

std::vector<uint8_t> codes_of(const std::string& hex) {
  std::vector<uint8_t> codes(32, 0);
  for (size_t i = 0; i < hex.size(); ++i) codes[i] = static_cast<uint8_t>(std::stoi(hex.substr(i, 1), nullptr, 16));
  return codes;
}

void check_column(const Vector& v, const Expected& ex, ScaleRule rule, const std::vector<uint8_t>* packed_expected) {
  const std::vector<float> x = block_of(v.x);
  std::vector<uint16_t> xb(32);
  for (int i = 0; i < 32; ++i) xb[i] = f32_to_bf16(x[i]);
  for (int i = 0; i < 32; ++i) ASSERT_EQ(widen_bf16(xb[i]), x[i]) << "vector values must be exact in bf16";
  const std::vector<uint8_t> codes = codes_of(ex.codes);
  std::vector<uint8_t> packed_from_codes(16);
  pack_e2m1(codes.data(), 32, packed_from_codes.data());
  if (packed_expected) {
    std::vector<uint8_t> p(16, 0);
    std::copy(packed_expected->begin(), packed_expected->end(), p.begin());
    ASSERT_EQ(packed_from_codes, p) << v.name << ": the spec's codes and packed bytes disagree";
  }
  const std::vector<float> deq_expected = [&] {
    // Listed values, else code value times scale (the spec lists only the leading ones).
    std::vector<float> d(32);
    for (int i = 0; i < 32; ++i) d[i] = e2m1_value(codes[i]) * std::ldexp(1.0f, ex.scale_byte - 127);
    for (size_t i = 0; i < ex.dequant.size(); ++i) EXPECT_EQ(d[i], ex.dequant[i]) << v.name << " element " << i;
    return d;
  }();
  for (Isa isa : supported_isas()) {
    ScopedIsa scoped(isa);
    SCOPED_TRACE(std::string(v.name) + (rule == ScaleRule::Even ? " Q " : " F ") + isa_name(isa));
    std::vector<uint8_t> packed(16), scale(1), packed_b(16), scale_b(1);
    quantize_f32(x.data(), 1, 32, packed.data(), scale.data(), rule);
    quantize_bf16(xb.data(), 1, 32, packed_b.data(), scale_b.data(), rule);
    EXPECT_EQ(scale[0], ex.scale_byte);
    EXPECT_EQ(scale_b[0], ex.scale_byte);
    EXPECT_EQ(packed, packed_from_codes);
    EXPECT_EQ(packed_b, packed_from_codes);
    std::vector<float> deq(32);
    std::vector<uint16_t> deq_b(32);
    dequantize_f32(packed.data(), scale.data(), 1, 32, deq.data());
    dequantize_bf16(packed.data(), scale.data(), 1, 32, deq_b.data());
    for (int i = 0; i < 32; ++i) {
      EXPECT_EQ(deq[i], deq_expected[i]) << i;
      EXPECT_EQ(widen_bf16(deq_b[i]), deq_expected[i]) << i;
    }
    // QDQ: same values, but the sign of zero follows the input (vLLM kernel): G's element 0 and A's
    // elements 15 (-0.25) and 23 (-0.125) are -0.0.
    std::vector<float> q = x;
    std::vector<uint16_t> qb = xb;
    qdq_f32(q.data(), 32, rule);
    qdq_bf16(qb.data(), 32, rule);
    for (int i = 0; i < 32; ++i) {
      const float expected = std::copysign(deq_expected[i], x[i]);
      EXPECT_EQ(bits_of(q[i]), bits_of(expected)) << i;
      EXPECT_EQ(bits_of(widen_bf16(qb[i])), bits_of(expected)) << i;
    }
  }
}

TEST(MxSpecVectors, QuarkColumn) {
  for (const Vector& v : spec_vectors()) check_column(v, v.q, ScaleRule::Even, &v.q_packed);
}

TEST(MxSpecVectors, FloorColumn) {
  for (const Vector& v : spec_vectors()) check_column(v, v.f, ScaleRule::Floor, nullptr);
}

TEST(MxSpecVectors, QdqKeepsNegativeZeroWhereExportDoesNot) {
  std::vector<float> a = block_of(spec_vectors()[0].x);
  std::vector<float> g = block_of(spec_vectors().back().x);
  for (Isa isa : supported_isas()) {
    ScopedIsa scoped(isa);
    std::vector<float> qa = a, qg = g;
    qdq_f32(qa.data(), 32, ScaleRule::Even);
    qdq_f32(qg.data(), 32, ScaleRule::Even);
    EXPECT_EQ(bits_of(qa[15]), 0x80000000u);
    EXPECT_EQ(bits_of(qa[23]), 0x80000000u);
    EXPECT_EQ(bits_of(qg[0]), 0x80000000u);
  }
}

TEST(MxSpecVectors, DequantizationVectors) {
  struct D {
    uint8_t byte, scale;
    float v0, v1;
  };
  const D cases[] = {{0x21, 127, 0.5f, 1.0f}, {0xF8, 130, -0.0f, -48.0f}, {0x7F, 125, -1.5f, 1.5f}};
  for (Isa isa : supported_isas()) {
    ScopedIsa scoped(isa);
    for (const D& d : cases) {
      std::vector<uint8_t> packed(16, d.byte);
      std::vector<float> out(32);
      std::vector<uint16_t> out_b(32);
      dequantize_f32(packed.data(), &d.scale, 1, 32, out.data());
      dequantize_bf16(packed.data(), &d.scale, 1, 32, out_b.data());
      for (int i = 0; i < 32; i += 2) {
        EXPECT_EQ(bits_of(out[i]), bits_of(d.v0)) << isa_name(isa);
        EXPECT_EQ(bits_of(out[i + 1]), bits_of(d.v1)) << isa_name(isa);
        EXPECT_EQ(bits_of(widen_bf16(out_b[i])), bits_of(d.v0)) << isa_name(isa);
        EXPECT_EQ(bits_of(widen_bf16(out_b[i + 1])), bits_of(d.v1)) << isa_name(isa);
      }
    }
  }
}

}  // namespace
}  // namespace mxlm::mx
