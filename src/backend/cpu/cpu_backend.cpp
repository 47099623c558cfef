#include "backend/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/cpu/cpu_tp_group.h"
#include "backend/cpu/gemm.h"
#include "core/error.h"
#include "mx/mxfp4.h"

namespace mxlm::backend {

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<cpu::CpuBackend>(); }

namespace cpu {

namespace {

size_t element_bytes(WeightFormat f) {
  switch (f) {
    case WeightFormat::F32:
      return 4;
    case WeightFormat::BF16:
    case WeightFormat::F16:
      return 2;
    case WeightFormat::MXFP4:
      return 0;
  }
  return 0;
}

}  // namespace

HostWeight::HostWeight(const WeightData& d) : format_(d.format), rows_(d.rows), cols_(d.cols) {
  if (d.rows <= 0 || d.cols <= 0) fail("weight of invalid shape [{}, {}]", d.rows, d.cols);
  const size_t n = static_cast<size_t>(d.rows) * static_cast<size_t>(d.cols);
  if (format_ == WeightFormat::MXFP4) {
    if (d.cols % 32 != 0) fail("MXFP4 weight with {} columns (not a multiple of 32)", d.cols);
    data_.assign(static_cast<const uint8_t*>(d.data), static_cast<const uint8_t*>(d.data) + n / 2);
    scales_.assign(d.scales, d.scales + n / 32);
  } else {
    const size_t bytes = n * element_bytes(format_);
    data_.assign(static_cast<const uint8_t*>(d.data), static_cast<const uint8_t*>(d.data) + bytes);
  }
}

void HostWeight::row_f32(int64_t r, float* out) const {
  const size_t c = static_cast<size_t>(cols_);
  const size_t off = static_cast<size_t>(r) * c;
  switch (format_) {
    case WeightFormat::F32:
      std::memcpy(out, data_.data() + off * 4, c * 4);
      break;
    case WeightFormat::BF16: {
      const auto* p = reinterpret_cast<const uint16_t*>(data_.data()) + off;
      for (size_t i = 0; i < c; ++i) out[i] = bf16_to_f32(p[i]);
      break;
    }
    case WeightFormat::F16: {
      const auto* p = reinterpret_cast<const uint16_t*>(data_.data()) + off;
      for (size_t i = 0; i < c; ++i) out[i] = f16_to_f32(p[i]);
      break;
    }
    case WeightFormat::MXFP4:
      mx::dequantize_f32(data_.data() + off / 2, scales_.data() + off / 32, 1, c, out);
      break;
  }
}

const HostWeight& host(const Weight& w) { return static_cast<const HostWeight&>(w); }

std::unique_ptr<Buffer> CpuBackend::alloc(size_t count) { return std::make_unique<HostBuffer>(count); }

void CpuBackend::upload(Buffer& dst, size_t offset, const float* src, size_t count) {
  if (offset + count > dst.size())
    fail("upload of {} elements at {} overflows a buffer of {}", count, offset, dst.size());
  std::memcpy(dst.f32() + offset, src, count * sizeof(float));
}

void CpuBackend::download(const Buffer& src, size_t offset, float* dst, size_t count) {
  if (offset + count > src.size())
    fail("download of {} elements at {} overflows a buffer of {}", count, offset, src.size());
  std::memcpy(dst, const_cast<Buffer&>(src).f32() + offset, count * sizeof(float));
}

void CpuBackend::copy(const float* src, float* dst, size_t count) { std::memmove(dst, src, count * sizeof(float)); }

std::unique_ptr<Weight> CpuBackend::upload_weight(const WeightData& data) { return std::make_unique<HostWeight>(data); }

std::unique_ptr<Buffer> CpuBackend::upload_vector(std::span<const float> values) {
  auto b = std::make_unique<HostBuffer>(values.size());
  std::memcpy(b->f32(), values.data(), values.size() * sizeof(float));
  return b;
}

void CpuBackend::add(const float* a, const float* b, float* out, size_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (size_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

void CpuBackend::scale(float* x, float factor, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] *= factor;
}

void CpuBackend::rms_norm(const float* x, const float* w, float* out, size_t rows, size_t dim, float eps,
                          bool add_one) {
#pragma omp parallel for schedule(static) if (rows * dim > 65536)
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* o = out + r * dim;
    float sum = 0.0f;
    for (size_t i = 0; i < dim; ++i) sum += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(dim) + eps);
    for (size_t i = 0; i < dim; ++i) o[i] = xr[i] * inv * (add_one ? 1.0f + w[i] : w[i]);
  }
}

void CpuBackend::rope(float* x, std::span<const int32_t> positions, int heads, int head_dim, int rotary_dim,
                      float theta) {
  if (rotary_dim % 2 != 0 || rotary_dim > head_dim) fail("rotary_dim {} invalid for head_dim {}", rotary_dim, head_dim);
  const int half = rotary_dim / 2;
  std::vector<float> inv_freq(static_cast<size_t>(half));
  // As transformers: theta ** (arange(0, dim, 2) / dim) in f32, then its reciprocal.
  for (int j = 0; j < half; ++j)
    inv_freq[static_cast<size_t>(j)] =
        1.0f / std::pow(theta, static_cast<float>(2 * j) / static_cast<float>(rotary_dim));
  const size_t tokens = positions.size();
#pragma omp parallel for schedule(static) if (tokens * static_cast <size_t>(heads) > 4096)
  for (size_t t = 0; t < tokens; ++t) {
    const float pos = static_cast<float>(positions[t]);
    for (int j = 0; j < half; ++j) {
      const float angle = pos * inv_freq[static_cast<size_t>(j)];
      const float c = std::cos(angle), s = std::sin(angle);
      for (int h = 0; h < heads; ++h) {
        float* v = x + (t * static_cast<size_t>(heads) + static_cast<size_t>(h)) * static_cast<size_t>(head_dim);
        const float a = v[j], b = v[j + half];
        v[j] = a * c - b * s;
        v[j + half] = b * c + a * s;
      }
    }
  }
}

void CpuBackend::swiglu_oai(const float* gate, const float* up, float* out, size_t n, SwigluParams p) {
  for (size_t i = 0; i < n; ++i) {
    const float g = std::min(gate[i], p.limit);
    const float u = std::clamp(up[i], -p.limit, p.limit);
    out[i] = (u + 1.0f) * (g * (1.0f / (1.0f + std::exp(-p.alpha * g))));
  }
}

void CpuBackend::qdq_mxfp4(float* x, size_t rows, size_t k) {
  if (k % mx::kBlockSize != 0) fail("MXFP4 activation QDQ over K = {} (not a multiple of 32)", k);
  mx::qdq_f32(x, rows * k);
}

void CpuBackend::linear(const float* x, size_t m, const Weight& w, float* y) {
  const HostWeight& hw = host(w);
  const size_t n = static_cast<size_t>(w.rows()), k = static_cast<size_t>(w.cols());
  if (m == 0) return;
  switch (w.format()) {
    case WeightFormat::F32:
      mxlm::cpu::gemm_f32(x, m, k, reinterpret_cast<const float*>(hw.bytes()), n, y);
      break;
    case WeightFormat::BF16:
      mxlm::cpu::gemm_bf16(x, m, k, reinterpret_cast<const uint16_t*>(hw.bytes()), n, y);
      break;
    case WeightFormat::F16:
      mxlm::cpu::gemm_f16(x, m, k, reinterpret_cast<const uint16_t*>(hw.bytes()), n, y);
      break;
    case WeightFormat::MXFP4:
      mxlm::cpu::gemm_mxfp4(x, m, k, hw.bytes(), hw.scales(), n, y);
      break;
  }
}

void CpuBackend::embedding(const Weight& table, std::span<const int32_t> ids, int64_t row_offset, float* out) {
  const HostWeight& hw = host(table);
  const size_t dim = static_cast<size_t>(table.cols());
  for (size_t i = 0; i < ids.size(); ++i) {
    const int64_t r = static_cast<int64_t>(ids[i]) - row_offset;
    if (r < 0 || r >= table.rows()) {
      std::fill(out + i * dim, out + (i + 1) * dim, 0.0f);
    } else {
      hw.row_f32(r, out + i * dim);
    }
  }
}

void CpuBackend::cache_write(const float* x, size_t width, std::span<const int64_t> slots, float* cache) {
  for (size_t i = 0; i < slots.size(); ++i)
    if (slots[i] >= 0) std::memcpy(cache + static_cast<size_t>(slots[i]) * width, x + i * width, width * sizeof(float));
}

int CpuBackend::tp_size() const { return group_ ? group_->size() : 1; }

void CpuBackend::abort_collectives(const std::string& reason) {
  if (group_) group_->abort(reason);
}

void CpuBackend::all_reduce_sum(float* x, size_t n) {
  if (group_) group_->all_reduce_sum(rank_, x, n);
}

void CpuBackend::all_gather_cols(const float* x, size_t rows, size_t cols_per_rank, float* out) {
  if (group_) {
    group_->all_gather_cols(rank_, x, rows, cols_per_rank, out);
  } else {
    std::memmove(out, x, rows * cols_per_rank * sizeof(float));
  }
}

}  // namespace cpu
}  // namespace mxlm::backend
