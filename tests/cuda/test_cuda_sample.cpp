// GPU checks of sampling on the device (Backend::sample_rows, cuda_sample.cu): the CUDA backend must draw the token
// the CPU reference backend::sample_row draws, token for token, on fresh random logits: the real vocabulary (200064)
// and small ragged ones, many rows with mixed parameters per row (greedy, temperature, top-k, top-p, min-p, seeds,
// counters), logits with many exact ties (the radix select then resolves the order by token id), greedy ties,
// -inf everywhere but one token, and rows of -inf.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/sampling.h"
#include "gpu_check.h"

namespace mxlm::gpucheck {
namespace {

using backend::SampleParams;

// Draws of `rows` rows of `cols` on the GPU against the CPU reference; reports the mismatches.
void compare_rows(Env& env, const std::string& what, const std::vector<float>& logits, size_t rows, size_t cols,
                  const std::vector<SampleParams>& params) {
  auto x = up(env.gpu, logits);
  auto out = env.gpu.alloc(rows);
  env.gpu.sample_rows(x->f32(), rows, cols, params, out->i32());
  const auto got = down_i32(env.gpu, *out, rows);
  size_t bad = 0;
  std::string first;
  for (size_t r = 0; r < rows; ++r) {
    const int32_t want = backend::sample_row({logits.data() + r * cols, cols}, params[r]);
    if (got[r] != want) {
      if (bad++ == 0)
        first = " first: row " + std::to_string(r) + " gpu " + std::to_string(got[r]) + " cpu " + std::to_string(want);
    }
  }
  report(bad == 0, what + " (" + std::to_string(rows) + " rows x " + std::to_string(cols) + ")" + first,
         static_cast<double>(bad), 0);
}

SampleParams random_params(std::mt19937& g, size_t r) {
  SampleParams p;
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  switch (r % 8) {
    case 0:
      p.temperature = 0.0f;
      break;  // greedy
    case 1:
      p.temperature = 0.7f, p.top_p = 0.9f;
      break;  // the common chat setting
    case 2:
      p.temperature = 1.0f;
      break;  // plain
    case 3:
      p.temperature = 0.6f, p.top_k = 20, p.top_p = 0.95f;
      break;  // both cuts
    case 4:
      p.temperature = 1.3f, p.top_k = 1 + static_cast<int>(g() % 300);
      break;
    case 5:
      p.temperature = 0.8f, p.min_p = 0.05f + 0.2f * u(g);
      break;
    case 6:
      p.temperature = 0.1f + 2.0f * u(g), p.top_p = 0.05f + 0.9f * u(g), p.top_k = static_cast<int>(g() % 3) * 50;
      break;
    default:
      p.temperature = 1.0f, p.top_p = 0.5f, p.min_p = 0.01f;
      break;
  }
  p.seed = g();
  p.seed = (p.seed << 32) | g();
  p.counter = g() % 100000;
  return p;
}

MXLM_GPU_CHECK(sample) {
  std::mt19937 g(20261126);
  // The real vocabulary, 48 rows of mixed parameters (every case several times), sigma 2 and 6 logits.
  for (float sigma : {2.0f, 6.0f}) {
    const size_t rows = 48, cols = 200064;
    std::vector<float> l = randn(rows * cols, sigma);
    std::vector<SampleParams> ps;
    for (size_t r = 0; r < rows; ++r) ps.push_back(random_params(g, r));
    compare_rows(env, "sample_rows vocab 200064 sigma " + std::to_string(static_cast<int>(sigma)), l, rows, cols, ps);
  }
  // Ragged small vocabularies, all parameter kinds.
  for (size_t cols : {1, 2, 31, 33, 1000, 4097, 65537}) {
    const size_t rows = 40;
    std::vector<float> l = randn(rows * cols, 3.0f);
    std::vector<SampleParams> ps;
    for (size_t r = 0; r < rows; ++r) ps.push_back(random_params(g, r));
    compare_rows(env, "sample_rows ragged vocab", l, rows, cols, ps);
  }
  // Many exact ties: logits on a coarse grid (equal keys; the cut order falls to token ids).
  {
    const size_t rows = 32, cols = 200064;
    std::vector<float> l = randn(rows * cols, 2.0f);
    for (auto& v : l) v = std::round(v * 2.0f) / 2.0f;
    std::vector<SampleParams> ps;
    for (size_t r = 0; r < rows; ++r) ps.push_back(random_params(g, r));
    compare_rows(env, "sample_rows tied logits", l, rows, cols, ps);
  }
  // Greedy ties, one finite token among -inf, all -inf.
  {
    const size_t cols = 50000;
    const float ninf = -std::numeric_limits<float>::infinity();
    std::vector<float> l;
    std::vector<SampleParams> ps;
    for (int r = 0; r < 24; ++r) {
      std::vector<float> row = randn(cols, 1.0f);
      if (r % 3 == 0) {
        row[static_cast<size_t>(17 + r)] = row[static_cast<size_t>(40000 - r)] = row[3] = 9.0f;  // tied maxima
      } else if (r % 3 == 1) {
        std::fill(row.begin(), row.end(), ninf);
        row[static_cast<size_t>(g() % cols)] = -3.0f;
      } else {
        std::fill(row.begin(), row.end(), ninf);
      }
      l.insert(l.end(), row.begin(), row.end());
      SampleParams p = random_params(g, static_cast<size_t>(r));
      ps.push_back(p);
    }
    compare_rows(env, "sample_rows ties / -inf rows", l, ps.size(), cols, ps);
  }
  // One row, many counters: the stream itself on the device.
  {
    const size_t cols = 200064, rows = 64;
    const std::vector<float> one = randn(cols, 2.0f);
    std::vector<float> l;
    std::vector<SampleParams> ps;
    for (size_t r = 0; r < rows; ++r) {
      l.insert(l.end(), one.begin(), one.end());
      SampleParams p;
      p.temperature = 0.9f;
      p.top_p = 0.9f;
      p.seed = 42;
      p.counter = r;
      ps.push_back(p);
    }
    compare_rows(env, "sample_rows one row, 64 counters", l, rows, cols, ps);
  }
}

}  // namespace
}  // namespace mxlm::gpucheck
