#include "backend/backend.h"

#include <algorithm>
#include <vector>

#include "core/error.h"

namespace mxlm::backend {

namespace {

// Counter-based (splitmix64 finaliser): element i of a stream depends only on (seed, i).
uint64_t mix(uint64_t seed, uint64_t i) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + i + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

float uniform_pm(uint64_t seed, uint64_t i, float amplitude) {  // uniform in [-amplitude, amplitude)
  const double u = static_cast<double>(mix(seed, i) >> 11) * 0x1.0p-53;
  return static_cast<float>((2.0 * u - 1.0) * amplitude);
}

}  // namespace

std::unique_ptr<Weight> Backend::random_weight(WeightFormat format, int64_t rows, int64_t cols, uint64_t seed) {
  if (rows <= 0 || cols <= 0) fail("weight of invalid shape [{}, {}]", rows, cols);
  const size_t n = static_cast<size_t>(rows) * static_cast<size_t>(cols);
  constexpr float kAmplitude = 0.05f;
  switch (format) {
    case WeightFormat::F32: {
      std::vector<float> v(n);
      for (size_t i = 0; i < n; ++i) v[i] = uniform_pm(seed, i, kAmplitude);
      return upload_weight({format, rows, cols, v.data(), nullptr});
    }
    case WeightFormat::BF16:
    case WeightFormat::F16: {
      std::vector<uint16_t> v(n);
      for (size_t i = 0; i < n; ++i) {
        const float x = uniform_pm(seed, i, kAmplitude);
        v[i] = format == WeightFormat::BF16 ? f32_to_bf16(x) : f32_to_f16(x);
      }
      return upload_weight({format, rows, cols, v.data(), nullptr});
    }
    case WeightFormat::MXFP4: {
      if (cols % 32 != 0) fail("MXFP4 weight with {} columns (not a multiple of 32)", cols);
      std::vector<uint8_t> packed(n / 2), scales(n / 32);
      for (size_t i = 0; i < packed.size(); ++i) packed[i] = static_cast<uint8_t>(mix(seed, i) >> 56);
      for (size_t i = 0; i < scales.size(); ++i) scales[i] = static_cast<uint8_t>(118 + mix(seed ^ 0x5555, i) % 7);
      return upload_weight({format, rows, cols, packed.data(), scales.data()});
    }
  }
  fail("random weight of unknown format {}", static_cast<int>(format));
}

void Backend::check_shared_expert(const SharedExpert& s, size_t hidden) {
  if (!s.gate || !s.up || !s.down) fail("shared expert without its gate, up or down weight");
  const int64_t h = static_cast<int64_t>(hidden), inter = s.gate->rows();
  if (s.gate->cols() != h || s.up->rows() != inter || s.up->cols() != h || s.down->rows() != h ||
      s.down->cols() != inter)
    fail("shared expert of gate [{}, {}], up [{}, {}], down [{}, {}] for hidden size {}", s.gate->rows(),
         s.gate->cols(), s.up->rows(), s.up->cols(), s.down->rows(), s.down->cols(), h);
}

void Backend::add_shared_expert(const float* x, size_t tokens, size_t hidden, const SharedExpert& s, SwigluParams p,
                                float* out) {
  check_shared_expert(s, hidden);
  if (tokens == 0) return;
  const size_t inter = static_cast<size_t>(s.gate->rows());
  // M3Model::linear: an MXFP4 weight's input is QDQ'd per token in groups of 32 (the MXFP4 emulation).
  auto linear_qdq = [&](const float* in, size_t k, const Weight& w, float* y) {
    if (!w.mxfp4()) {
      linear(in, tokens, w, y);
      return;
    }
    auto tmp = alloc(tokens * k);
    copy(in, tmp->f32(), tokens * k);
    qdq_mxfp4(tmp->f32(), tokens, k);
    linear(tmp->f32(), tokens, w, y);
  };
  auto g = alloc(tokens * inter), u = alloc(tokens * inter), y = alloc(tokens * hidden);
  linear_qdq(x, hidden, *s.gate, g->f32());
  linear_qdq(x, hidden, *s.up, u->f32());
  swiglu_oai(g->f32(), u->f32(), g->f32(), tokens * inter, p);
  linear_qdq(g->f32(), inter, *s.down, y->f32());
  add(out, y->f32(), out, tokens * hidden);
}

std::unique_ptr<StepBinding> Backend::bind_step(const AttentionBatch&, std::span<const int32_t>, StepGraph* graph) {
  if (graph) fail("backend {} has no captured steps", name());
  return nullptr;
}

std::unique_ptr<StepGraph> Backend::make_step_graph(int, int) { fail("backend {} has no captured steps", name()); }

void Backend::run_step(StepGraph&, const std::function<void()>&) { fail("backend {} has no captured steps", name()); }

void Backend::capture_step(StepGraph&, const std::function<void()>&) {
  fail("backend {} has no captured steps", name());
}

void Backend::replay_step(StepGraph&, const AttentionBatch&, std::span<const int32_t>) {
  fail("backend {} has no captured steps", name());
}

const char* weight_format_name(WeightFormat format) {
  switch (format) {
    case WeightFormat::F32:
      return "F32";
    case WeightFormat::BF16:
      return "BF16";
    case WeightFormat::F16:
      return "F16";
    case WeightFormat::MXFP4:
      return "MXFP4";
  }
  return "?";
}

void Backend::argmax_rows(const float* x, size_t rows, size_t cols, int32_t* out) {
  if (rows == 0) return;
  if (cols == 0) fail("argmax over rows of 0 columns");
  auto values = alloc(rows * cols);
  copy(x, values->f32(), rows * cols);
  std::vector<float> host(rows * cols);
  download(*values, 0, host.data(), host.size());
  std::vector<int32_t> ids(rows);
  for (size_t r = 0; r < rows; ++r) {
    const float* row = host.data() + r * cols;
    ids[r] = static_cast<int32_t>(std::max_element(row, row + cols) - row);  // first of equal maxima, as the sampler
  }
  auto result = alloc(rows);
  upload(*result, 0, reinterpret_cast<const float*>(ids.data()), rows);
  copy(result->f32(), reinterpret_cast<float*>(out), rows);
}

}  // namespace mxlm::backend
