// Scalar element/scale codecs, argument checks and the runtime dispatch of the block kernels.
#include "mx/mxfp4.h"

#include <atomic>
#include <cmath>

#if defined(__x86_64__)
#endif

#include "core/cpu_features.h"
#include "core/error.h"
#include "mx/dispatch.h"
#include "mx/kernels.h"

namespace mxlm::mx {

namespace detail {

void check_rows(const char* what, size_t k) {
  if (k % kBlockSize != 0) fail("{}: row length {} is not a multiple of the MX block size {}", what, k, kBlockSize);
}

void check_groups(const char* what, size_t n) {
  if (n % kBlockSize != 0) fail("{}: element count {} is not a multiple of the MX block size {}", what, n, kBlockSize);
}

void fail_non_finite(const char* what, size_t index, size_t k, float value) {
  fail("{}: cannot quantize non-finite value {} at row {}, column {}", what, value, index / k, index % k);
}

}  // namespace detail

float e2m1_value(uint8_t code) {
  static constexpr float kMagnitudes[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  if (code > 15) fail("e2m1_value: code {} is not a 4-bit E2M1 code", code);
  const float magnitude = kMagnitudes[code & 7];
  return (code & 8) ? -magnitude : magnitude;
}

float e8m0_value(uint8_t byte) {
  if (byte == 255) return std::bit_cast<float>(detail::kF32QuietNan);
  return detail::pow2(static_cast<int>(byte) - 127);
}

uint8_t e8m0_encode(int exponent) {
  if (exponent < -127 || exponent > 127) fail("e8m0_encode: exponent {} is outside [-127, 127]", exponent);
  return static_cast<uint8_t>(exponent + 127);
}

uint8_t export_scale_byte(int exponent) {
  const uint8_t byte = e8m0_encode(exponent);
  return byte == 0 ? 1 : byte;
}

int scale_exponent(float amax, ScaleRule rule) {
  if (std::isnan(amax) || amax < 0.0f) fail("scale_exponent: amax must be >= 0 or +Inf, got {}", amax);
  return detail::scale_exponent_from_bits(std::bit_cast<uint32_t>(amax) & 0x7fffffffu, rule);
}

uint8_t e2m1_encode(float y) {
  // Round to nearest with ties to the even code: a midpoint goes down when the code below is even
  // (0, 1.0, 2.0, 4.0) and up otherwise. Everything past 5 (the 4/6 midpoint) is 6, including Inf and NaN.
  const float a = std::fabs(y);
  uint8_t code;
  if (a <= 0.25f)
    code = 0;
  else if (a < 0.75f)
    code = 1;
  else if (a <= 1.25f)
    code = 2;
  else if (a < 1.75f)
    code = 3;
  else if (a <= 2.5f)
    code = 4;
  else if (a < 3.5f)
    code = 5;
  else if (a <= 5.0f)
    code = 6;
  else
    code = 7;
  if (code != 0 && std::signbit(y)) code |= 8;
  return code;
}

void pack_e2m1(const uint8_t* codes, size_t n, uint8_t* packed) {
  if (n % 2 != 0) fail("pack_e2m1: code count {} is odd", n);
  for (size_t j = 0; j < n / 2; ++j) {
    if ((codes[2 * j] | codes[2 * j + 1]) > 15) fail("pack_e2m1: code at {} is not a 4-bit E2M1 code", 2 * j);
    packed[j] = static_cast<uint8_t>(codes[2 * j] | codes[2 * j + 1] << 4);
  }
}

void unpack_e2m1(const uint8_t* packed, size_t n, uint8_t* codes) {
  if (n % 2 != 0) fail("unpack_e2m1: code count {} is odd", n);
  for (size_t j = 0; j < n / 2; ++j) {
    codes[2 * j] = packed[j] & 0x0f;
    codes[2 * j + 1] = packed[j] >> 4;
  }
}

// ---- dispatch ----

namespace {

const detail::Kernels* kernels_for(Isa isa) {
  switch (isa) {
    case Isa::Scalar:
      return &detail::kScalarKernels;
    case Isa::Avx2:
      return detail::kAvx2Kernels;
    case Isa::Avx512:
      return detail::kAvx512Kernels;
  }
  return nullptr;
}


bool cpu_has(Isa isa) {
  switch (isa) {
    case Isa::Scalar:
      return true;
    case Isa::Avx2:
      return __builtin_cpu_supports("avx2") && cpu_has_f16c();
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl");
  }
  return false;
}

Isa best_isa() {
  for (Isa isa : {Isa::Avx512, Isa::Avx2})
    if (isa_supported(isa)) return isa;
  return Isa::Scalar;
}

std::atomic<const detail::Kernels*> g_forced{nullptr};

const detail::Kernels& active() {
  if (const detail::Kernels* forced = g_forced.load(std::memory_order_relaxed)) return *forced;
  static const detail::Kernels* const best = kernels_for(best_isa());
  return *best;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar:
      return "scalar";
    case Isa::Avx2:
      return "avx2";
    case Isa::Avx512:
      return "avx512";
  }
  return "unknown";
}

bool isa_supported(Isa isa) { return kernels_for(isa) != nullptr && cpu_has(isa); }

std::vector<Isa> supported_isas() {
  std::vector<Isa> isas;
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512})
    if (isa_supported(isa)) isas.push_back(isa);
  return isas;
}

Isa current_isa() { return active().isa; }

void force_isa(Isa isa) {
  if (!isa_supported(isa)) fail("mx: ISA {} is not supported on this CPU or build", isa_name(isa));
  g_forced.store(kernels_for(isa), std::memory_order_relaxed);
}

void reset_isa() { g_forced.store(nullptr, std::memory_order_relaxed); }

const char* active_isa() { return isa_name(current_isa()); }

void quantize_f32(const float* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales, ScaleRule rule) {
  detail::check_rows("quantize_f32", k);
  active().quantize_f32(x, rows, k, packed, scales, rule);
}

void quantize_bf16(const uint16_t* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales, ScaleRule rule) {
  detail::check_rows("quantize_bf16", k);
  active().quantize_bf16(x, rows, k, packed, scales, rule);
}

void quantize_f16(const uint16_t* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales, ScaleRule rule) {
  detail::check_rows("quantize_f16", k);
  active().quantize_f16(x, rows, k, packed, scales, rule);
}

void dequantize_f32(const uint8_t* packed, const uint8_t* scales, size_t rows, size_t k, float* out) {
  detail::check_rows("dequantize_f32", k);
  active().dequantize_f32(packed, scales, rows, k, out);
}

void dequantize_bf16(const uint8_t* packed, const uint8_t* scales, size_t rows, size_t k, uint16_t* out) {
  detail::check_rows("dequantize_bf16", k);
  active().dequantize_bf16(packed, scales, rows, k, out);
}

void qdq_f32(float* x, size_t n, ScaleRule rule) {
  detail::check_groups("qdq_f32", n);
  active().qdq_f32(x, n, rule);
}

void qdq_bf16(uint16_t* x, size_t n, ScaleRule rule) {
  detail::check_groups("qdq_bf16", n);
  active().qdq_bf16(x, n, rule);
}

}  // namespace mxlm::mx
