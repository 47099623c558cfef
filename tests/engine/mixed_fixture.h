// The engine tests' shared model: the committed "mixed" MiniMax-M3 fixture (sparse + dense layers, MoE) on the CPU
// backend in f32, loaded once per test binary, and random prompts over its vocabulary.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <random>
#include <vector>

#include "backend/backend.h"
#include "model/m3_model.h"

namespace mxlm::engine::testing {

struct MixedFixture {
  std::unique_ptr<backend::Backend> be = backend::make_cpu_backend();
  std::unique_ptr<model::M3Model> model;
  MixedFixture() {
    model::ModelOptions o;
    o.float_format = backend::WeightFormat::F32;
    model = model::load_m3_model(std::filesystem::path(MXLM_SOURCE_DIR) / "tests/fixtures/m3/mixed", *be, o);
  }
};

inline MixedFixture& mixed_fixture() {
  static MixedFixture f;
  return f;
}

// `count` prompts of 3..32 tokens drawn from ids 3..502, reproducible from `seed`.
inline std::vector<std::vector<int32_t>> make_prompts(int count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < count; ++i) {
    std::vector<int32_t> p(3 + rng() % 30);
    for (auto& t : p) t = static_cast<int32_t>(3 + rng() % 500);
    prompts.push_back(p);
  }
  return prompts;
}

}  // namespace mxlm::engine::testing
