// Whole-row kernels on random data: every ISA against the scalar reference (bit for bit), the reference
// against the independent brute-force formulation, QDQ against dequantize(quantize), NaN/Inf, packing,
// argument errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "mx/dispatch.h"
#include "mx/mxfp4.h"
#include "mx_test_util.h"

namespace mxlm::mx {
namespace {

using namespace testing;

// Random f32 data built to hit the hard cases: a block max at, just below or above 1.75 * 2^E, exact ties
// relative to the scale, zeros of both signs, float32 and bf16 subnormals, huge and tiny exponents.
class BlockGenerator {
 public:
  explicit BlockGenerator(uint32_t seed) : rng_(seed) {}

  std::vector<float> blocks(size_t count) {
    std::vector<float> x;
    for (size_t b = 0; b < count; ++b) append_block(x);
    return x;
  }

 private:
  int uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }
  float sign() { return uniform(0, 1) ? -1.0f : 1.0f; }

  void append_block(std::vector<float>& x) {
    const int kind = uniform(0, 9);
    const int top = kind == 0 ? uniform(120, 127) : (kind == 1 ? uniform(-149, -120) : uniform(-40, 40));
    const float mantissas[] = {1.75f, 1.5f, 1.0f, 1.9921875f, 1.7421875f, 1.75f + 0x1p-20f};
    const float amax_m =
        uniform(0, 2) ? mantissas[uniform(0, 5)] : std::uniform_real_distribution<float>(1.0f, 2.0f)(rng_);
    const size_t start = x.size();
    for (int i = 0; i < 32; ++i) {
      float v = 0.0f;
      switch (uniform(0, 7)) {
        case 0:
          v = uniform(0, 1) ? 0.0f : -0.0f;
          break;
        case 1: {  // an exact tie relative to the (floor) scale 2^(top-2)
          const float ties[] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f, 7.0f};
          v = sign() * std::ldexp(ties[uniform(0, 7)], top - 2);
          break;
        }
        case 2:  // a float32 subnormal or tiny value
          v = std::bit_cast<float>(static_cast<uint32_t>(uniform(1, 0x7fffff))) * sign();
          break;
        case 3:  // a grid value at the scale, exactly
          v = sign() * std::ldexp(static_cast<float>(kGrid[uniform(0, 7)]), top - 2);
          break;
        default:  // random magnitude within ~2^-30 of the max
          v = sign() * std::ldexp(std::uniform_real_distribution<float>(1.0f, 2.0f)(rng_), top - uniform(0, 30));
      }
      x.push_back(v);
    }
    if (uniform(0, 3) != 0) x[start + uniform(0, 31)] = sign() * std::ldexp(amax_m, top);  // the block max
    if (kind == 2) std::fill(x.begin() + start, x.end(), uniform(0, 1) ? 0.0f : -0.0f);    // all-zero block
    for (size_t i = start; i < x.size(); ++i)
      if (!std::isfinite(x[i])) x[i] = sign() * std::numeric_limits<float>::max();
  }

  std::mt19937 rng_;
};

std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> b(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    b[i] = f32_to_bf16(x[i]);
    if ((b[i] & 0x7fff) >= 0x7f80) b[i] = (b[i] & 0x8000) | 0x7f7f;  // rounding overflowed to Inf
  }
  return b;
}

std::vector<uint16_t> to_f16(const std::vector<float>& x) {
  std::vector<uint16_t> h(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    h[i] = f32_to_f16(x[i]);
    if ((h[i] & 0x7fff) >= 0x7c00) h[i] = (h[i] & 0x8000) | 0x7bff;
  }
  return h;
}

struct Quantized {
  std::vector<uint8_t> packed, scales;
};

// The reference against the independent formulation: codes, export scale bytes and QDQ values.
TEST(MxReference, MatchesBruteForceOnRandomBlocks) {
  BlockGenerator gen(1);
  const std::vector<float> x = gen.blocks(20000);
  for (ScaleRule rule : {ScaleRule::Even, ScaleRule::Floor}) {
    Quantized q{std::vector<uint8_t>(x.size() / 2), std::vector<uint8_t>(x.size() / 32)};
    ref::quantize_f32(x.data(), x.size() / 32, 32, q.packed.data(), q.scales.data(), rule);
    std::vector<float> qdq = x;
    ref::qdq_f32(qdq.data(), qdq.size(), rule);
    for (size_t b = 0; b < x.size() / 32; ++b) {
      double amax = 0;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(static_cast<double>(x[b * 32 + i])));
      const int e = brute_exponent(amax, rule);
      ASSERT_EQ(q.scales[b], std::max(e + 127, 1)) << "block " << b;
      for (int i = 0; i < 32; ++i) {
        const size_t j = b * 32 + i;
        const double y = std::ldexp(static_cast<double>(x[j]), -e);
        const uint8_t code = brute_code(y);
        ASSERT_EQ((j % 2 == 0) ? q.packed[j / 2] & 15 : q.packed[j / 2] >> 4, code) << "element " << j << " " << x[j];
        const float value = static_cast<float>(std::copysign(std::ldexp(kGrid[code & 7], e), x[j]));
        ASSERT_EQ(bits_of(qdq[j]), bits_of(value)) << "element " << j << " " << x[j];
      }
    }
  }
}

// Every ISA equals the reference on random row shapes, unaligned pointers included.
TEST(MxKernels, EveryIsaMatchesReferenceBitForBit) {
  BlockGenerator gen(2);
  std::mt19937 rng(3);
  for (int trial = 0; trial < 60; ++trial) {
    const size_t rows = 1 + rng() % 5, k = 32 * (1 + rng() % 40), n = rows * k;
    const size_t offset = rng() % 3;  // elements of misalignment
    std::vector<float> x(offset);
    const std::vector<float> data = gen.blocks(n / 32);
    x.insert(x.end(), data.begin(), data.end());
    const std::vector<uint16_t> xb = to_bf16(x), xh = to_f16(x);
    // Random packed bytes and every scale byte (0, 1, 254, 255 included) for dequantization.
    std::vector<uint8_t> rand_packed(n / 2 + offset), rand_scales(n / 32 + offset);
    for (auto& p : rand_packed) p = static_cast<uint8_t>(rng());
    for (size_t i = 0; i < rand_scales.size(); ++i) rand_scales[i] = static_cast<uint8_t>(i % 2 ? rng() : i * 37);
    for (ScaleRule rule : {ScaleRule::Even, ScaleRule::Floor}) {
      Quantized rf{std::vector<uint8_t>(n / 2), std::vector<uint8_t>(n / 32)}, rb = rf, rh = rf;
      ref::quantize_f32(x.data() + offset, rows, k, rf.packed.data(), rf.scales.data(), rule);
      ref::quantize_bf16(xb.data() + offset, rows, k, rb.packed.data(), rb.scales.data(), rule);
      ref::quantize_f16(xh.data() + offset, rows, k, rh.packed.data(), rh.scales.data(), rule);
      std::vector<float> qf(x.begin() + offset, x.end());
      std::vector<uint16_t> qb(xb.begin() + offset, xb.end());
      ref::qdq_f32(qf.data(), n, rule);
      ref::qdq_bf16(qb.data(), n, rule);
      std::vector<float> df(n);
      std::vector<uint16_t> db(n);
      ref::dequantize_f32(rand_packed.data() + offset, rand_scales.data() + offset, rows, k, df.data());
      ref::dequantize_bf16(rand_packed.data() + offset, rand_scales.data() + offset, rows, k, db.data());
      for (Isa isa : supported_isas()) {
        ScopedIsa scoped(isa);
        SCOPED_TRACE(std::string(isa_name(isa)) + " rows=" + std::to_string(rows) + " k=" + std::to_string(k));
        Quantized vf = rf, vb = rf, vh = rf;
        std::fill(vf.packed.begin(), vf.packed.end(), 0xEE);
        std::fill(vb.packed.begin(), vb.packed.end(), 0xEE);
        std::fill(vh.packed.begin(), vh.packed.end(), 0xEE);
        quantize_f32(x.data() + offset, rows, k, vf.packed.data(), vf.scales.data(), rule);
        quantize_bf16(xb.data() + offset, rows, k, vb.packed.data(), vb.scales.data(), rule);
        quantize_f16(xh.data() + offset, rows, k, vh.packed.data(), vh.scales.data(), rule);
        ASSERT_EQ(vf.packed, rf.packed);
        ASSERT_EQ(vf.scales, rf.scales);
        ASSERT_EQ(vb.packed, rb.packed);
        ASSERT_EQ(vb.scales, rb.scales);
        ASSERT_EQ(vh.packed, rh.packed);
        ASSERT_EQ(vh.scales, rh.scales);
        std::vector<float> vqf(x.begin() + offset, x.end());
        std::vector<uint16_t> vqb(xb.begin() + offset, xb.end());
        qdq_f32(vqf.data(), n, rule);
        qdq_bf16(vqb.data(), n, rule);
        ASSERT_EQ(0, std::memcmp(vqf.data(), qf.data(), n * sizeof(float)));
        ASSERT_EQ(vqb, qb);
        std::vector<float> vdf(n);
        std::vector<uint16_t> vdb(n);
        dequantize_f32(rand_packed.data() + offset, rand_scales.data() + offset, rows, k, vdf.data());
        dequantize_bf16(rand_packed.data() + offset, rand_scales.data() + offset, rows, k, vdb.data());
        ASSERT_EQ(0, std::memcmp(vdf.data(), df.data(), n * sizeof(float)));
        ASSERT_EQ(vdb, db);
      }
    }
  }
}

// f16 and bf16 inputs widen exactly, so quantizing them equals quantizing their f32 values.
TEST(MxKernels, NarrowInputsEqualTheirWidenedValues) {
  BlockGenerator gen(4);
  const std::vector<float> x = gen.blocks(2000);
  const std::vector<uint16_t> xb = to_bf16(x), xh = to_f16(x);
  std::vector<float> wb(x.size()), wh(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    wb[i] = widen_bf16(xb[i]);
    wh[i] = f16_to_f32(xh[i]);
  }
  const size_t n = x.size();
  for (Isa isa : supported_isas()) {
    ScopedIsa scoped(isa);
    Quantized a{std::vector<uint8_t>(n / 2), std::vector<uint8_t>(n / 32)}, b = a;
    quantize_bf16(xb.data(), 1, n, a.packed.data(), a.scales.data());
    quantize_f32(wb.data(), 1, n, b.packed.data(), b.scales.data());
    EXPECT_EQ(a.packed, b.packed) << isa_name(isa);
    EXPECT_EQ(a.scales, b.scales) << isa_name(isa);
    quantize_f16(xh.data(), 1, n, a.packed.data(), a.scales.data());
    quantize_f32(wh.data(), 1, n, b.packed.data(), b.scales.data());
    EXPECT_EQ(a.packed, b.packed) << isa_name(isa);
    EXPECT_EQ(a.scales, b.scales) << isa_name(isa);
  }
}

// QDQ == dequantize(quantize) except: QDQ keeps -0.0 where the code is 0 (export writes +0), and blocks
// with e = -127 are written with scale byte 1, so their export dequantizes to exactly twice the QDQ value.
TEST(MxKernels, QdqEqualsDequantizeOfQuantizeUpToSignOfZero) {
  BlockGenerator gen(5);
  const std::vector<float> x = gen.blocks(20000);
  const size_t n = x.size();
  const std::vector<uint16_t> xb = to_bf16(x);
  size_t negative_zeros = 0, raised_blocks = 0;
  for (Isa isa : supported_isas()) {
    ScopedIsa scoped(isa);
    for (ScaleRule rule : {ScaleRule::Even, ScaleRule::Floor}) {
      Quantized q{std::vector<uint8_t>(n / 2), std::vector<uint8_t>(n / 32)}, qb = q;
      quantize_f32(x.data(), 1, n, q.packed.data(), q.scales.data(), rule);
      quantize_bf16(xb.data(), 1, n, qb.packed.data(), qb.scales.data(), rule);
      std::vector<float> deq(n), qdq = x;
      std::vector<uint16_t> deqb(n), qdqb = xb;
      dequantize_f32(q.packed.data(), q.scales.data(), 1, n, deq.data());
      dequantize_bf16(qb.packed.data(), qb.scales.data(), 1, n, deqb.data());
      qdq_f32(qdq.data(), n, rule);
      qdq_bf16(qdqb.data(), n, rule);
      // pass 0: f32 input, pass 1: bf16 input.
      for (int pass = 0; pass < 2; ++pass) {
        for (size_t b = 0; b < n / 32; ++b) {
          double amax = 0;
          for (size_t j = b * 32; j < b * 32 + 32; ++j)
            amax = std::max(amax, std::fabs(pass == 0 ? static_cast<double>(x[j]) : widen_bf16(xb[j])));
          const bool raised = brute_exponent(amax, rule) == -127;
          raised_blocks += raised;
          for (size_t i = b * 32; i < b * 32 + 32; ++i) {
            const float a = pass == 0 ? qdq[i] : widen_bf16(qdqb[i]);
            const float d = pass == 0 ? deq[i] : widen_bf16(deqb[i]);
            if (bits_of(a) == 0x80000000u) {
              ASSERT_EQ(bits_of(d), 0u) << i;  // export never writes code 8
              ++negative_zeros;
            } else if (raised) {
              ASSERT_EQ(bits_of(d), bits_of(2 * a)) << i;
            } else {
              ASSERT_EQ(bits_of(a), bits_of(d)) << i << " pass " << pass;
            }
          }
        }
      }
    }
  }
  EXPECT_GT(negative_zeros, 1000u);  // the generator must reach both exceptions
  EXPECT_GT(raised_blocks, 100u);
}

TEST(MxNonFinite, QuantizeRejectsNanAndInfWithPosition) {
  for (float bad : {std::nanf(""), INFINITY, -INFINITY}) {
    std::vector<float> x(3 * 64, 1.0f);
    x[64 + 37] = bad;  // row 1, column 37
    std::vector<uint16_t> xb(x.size()), xh(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      xb[i] = f32_to_bf16(x[i]);
      xh[i] = f32_to_f16(x[i]);
    }
    std::vector<uint8_t> packed(x.size() / 2), scales(x.size() / 32);
    for (Isa isa : supported_isas()) {
      ScopedIsa scoped(isa);
      auto expect_error = [&](auto&& call) {
        try {
          call();
          ADD_FAILURE() << isa_name(isa) << ": no error for " << bad;
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find("row 1, column 37"), std::string::npos) << e.what();
        }
      };
      expect_error([&] { quantize_f32(x.data(), 3, 64, packed.data(), scales.data()); });
      expect_error([&] { quantize_bf16(xb.data(), 3, 64, packed.data(), scales.data()); });
      expect_error([&] { quantize_f16(xh.data(), 3, 64, packed.data(), scales.data()); });
    }
  }
}

// Quark float32 fake-quant semantics: NaN poisons its block; Inf passes through with scale 2^127.
TEST(MxNonFinite, QdqNanBlockAndInfBlock) {
  std::vector<float> x(96, 1.0f);
  x[5] = std::nanf("");
  x[32 + 3] = -INFINITY;
  x[32 + 4] = 1e38f;   // 1.18 * 2^126: 0.59 at scale 2^127 -> 0.5 -> 2^126
  x[32 + 5] = -3e38f;  // 1.76 * 2^127 / 2^127 -> 2.0 -> 2^128 = -Inf (the even rule's top overshoot)
  x[32 + 6] = -1.0f;   // -> -0.0
  for (Isa isa : supported_isas()) {
    ScopedIsa scoped(isa);
    std::vector<float> q = x;
    qdq_f32(q.data(), q.size());
    std::vector<uint16_t> qb(x.size());
    for (size_t i = 0; i < x.size(); ++i) qb[i] = f32_to_bf16(x[i]);
    qdq_bf16(qb.data(), qb.size());
    for (int i = 0; i < 32; ++i) {
      EXPECT_EQ(bits_of(q[i]), 0x7fc00000u) << isa_name(isa);
      EXPECT_EQ(qb[i], 0x7fc0u) << isa_name(isa);
    }
    EXPECT_EQ(q[35], -INFINITY);
    EXPECT_EQ(q[36], 0x1p126f);
    EXPECT_EQ(q[37], -INFINITY);
    EXPECT_EQ(bits_of(q[38]), 0x80000000u);
    EXPECT_EQ(bits_of(q[33]), 0u);
    EXPECT_EQ(widen_bf16(qb[35]), -INFINITY);
    EXPECT_EQ(widen_bf16(qb[36]), 0x1p126f);
    EXPECT_EQ(bits_of(widen_bf16(qb[38])), 0x80000000u);
    for (int i = 64; i < 96; ++i) {
      EXPECT_EQ(q[i], 1.0f);  // other blocks untouched by the bad ones
      EXPECT_EQ(widen_bf16(qb[i]), 1.0f);
    }
  }
}

TEST(MxNonFinite, DequantizeScaleBytes) {
  std::vector<uint8_t> packed(16);
  for (int i = 0; i < 16; ++i) packed[i] = static_cast<uint8_t>(i | (15 - i) << 4);  // every code
  for (Isa isa : supported_isas()) {
    ScopedIsa scoped(isa);
    for (uint8_t s : {uint8_t{0}, uint8_t{1}, uint8_t{127}, uint8_t{253}, uint8_t{254}, uint8_t{255}}) {
      std::vector<float> out(32);
      std::vector<uint16_t> out_b(32);
      dequantize_f32(packed.data(), &s, 1, 32, out.data());
      dequantize_bf16(packed.data(), &s, 1, 32, out_b.data());
      for (int i = 0; i < 32; ++i) {
        const uint8_t code = i % 2 == 0 ? static_cast<uint8_t>(i / 2) : static_cast<uint8_t>(15 - i / 2);
        const double exact = std::ldexp(static_cast<double>(e2m1_value(code)), s - 127);
        const float expected = s == 255 ? as_f32(0x7fc00000u) : static_cast<float>(exact);  // overflow -> Inf
        EXPECT_EQ(bits_of(out[i]), bits_of(expected)) << isa_name(isa) << " scale " << int(s) << " code " << int(code);
        const uint16_t expected_b = s == 255 ? 0x7fc0 : static_cast<uint16_t>(bits_of(expected) >> 16);
        EXPECT_EQ(out_b[i], expected_b) << isa_name(isa) << " scale " << int(s) << " code " << int(code);
        EXPECT_EQ(bits_of(expected) & 0xffff, 0u);  // every such value is exact in bf16
      }
    }
  }
}

TEST(MxNonFinite, TopOfRangeEvenOvershootIsInf) {
  std::vector<uint16_t> x(32, 0);
  x[0] = 0x7f60;  // 1.75 * 2^127
  std::vector<uint8_t> packed(16), scale(1);
  quantize_bf16(x.data(), 1, 32, packed.data(), scale.data());
  EXPECT_EQ(scale[0], 254);
  EXPECT_EQ(packed[0], 0x04);  // 1.75 -> 2.0 at scale 2^127
  std::vector<uint16_t> out(32);
  dequantize_bf16(packed.data(), scale.data(), 1, 32, out.data());
  EXPECT_EQ(out[0], 0x7f80);
}

TEST(MxPacking, RoundTripsAndNibbleOrder) {
  std::mt19937 rng(6);
  std::vector<uint8_t> codes(1000), back(1000), packed(500);
  for (auto& c : codes) c = rng() % 16;
  pack_e2m1(codes.data(), codes.size(), packed.data());
  for (size_t j = 0; j < packed.size(); ++j) {
    ASSERT_EQ(packed[j] & 15, codes[2 * j]);
    ASSERT_EQ(packed[j] >> 4, codes[2 * j + 1]);
  }
  unpack_e2m1(packed.data(), codes.size(), back.data());
  EXPECT_EQ(back, codes);
  for (int byte = 0; byte < 256; ++byte) {
    uint8_t two[2], again;
    const uint8_t b = static_cast<uint8_t>(byte);
    unpack_e2m1(&b, 2, two);
    pack_e2m1(two, 2, &again);
    EXPECT_EQ(again, b);
  }
  EXPECT_THROW(pack_e2m1(codes.data(), 3, packed.data()), Error);
  codes[4] = 16;
  EXPECT_THROW(pack_e2m1(codes.data(), 10, packed.data()), Error);
  EXPECT_THROW(unpack_e2m1(packed.data(), 5, back.data()), Error);
}

TEST(MxArguments, RowLengthsMustBeWholeBlocks) {
  std::vector<float> x(64);
  std::vector<uint16_t> xb(64);
  std::vector<uint8_t> packed(32), scales(2);
  for (Isa isa : supported_isas()) {
    ScopedIsa scoped(isa);
    EXPECT_THROW(quantize_f32(x.data(), 1, 48, packed.data(), scales.data()), Error);
    EXPECT_THROW(quantize_bf16(xb.data(), 2, 16, packed.data(), scales.data()), Error);
    EXPECT_THROW(quantize_f16(xb.data(), 1, 33, packed.data(), scales.data()), Error);
    EXPECT_THROW(dequantize_f32(packed.data(), scales.data(), 1, 40, x.data()), Error);
    EXPECT_THROW(dequantize_bf16(packed.data(), scales.data(), 1, 40, xb.data()), Error);
    EXPECT_THROW(qdq_f32(x.data(), 63), Error);
    EXPECT_THROW(qdq_bf16(xb.data(), 31), Error);
    quantize_f32(x.data(), 0, 64, packed.data(), scales.data());  // empty is fine
    qdq_bf16(xb.data(), 0);
  }
  EXPECT_THROW(ref::qdq_f32(x.data(), 63, ScaleRule::Even), Error);
  EXPECT_THROW(force_isa(static_cast<Isa>(42)), Error);
}

}  // namespace
}  // namespace mxlm::mx
