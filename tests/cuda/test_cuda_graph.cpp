// Captured decode steps (CUDA graphs, model/step_graphs.h + backend/cuda/cuda_graph.cpp): the same sequences decoded
// in lockstep by models that differ only in ModelOptions::step_graphs. Replayed steps must give the bits of the eager
// path they replace (EagerPadded: the same padded step, bound the same way, run without a graph) while the batch
// changes between replays (sizes within one bucket, padding rows, contexts crossing a page boundary, a new page
// bucket), and stay close to the plain eager path (Off: unpadded, grids sized for the step), with the same greedy
// tokens.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
#include "engine/model_runner.h"
#include "engine/sequence.h"
#include "gpu_check.h"
#include "io/model_config.h"
#include "model/dummy_weights.h"
#include "model/m3_model.h"
#include "model/step_graphs.h"

namespace mxlm::gpucheck {
namespace {

using model::StepGraphs;

// MXLM_GRAPH_CHECK_TRACE=1: print each lane's step before it runs and synchronise after it (finds the step that
// faults).
bool trace() {
  const char* e = std::getenv("MXLM_GRAPH_CHECK_TRACE");
  return e && e[0] == '1';
}

// One model decoding its own copy of the sequences.
struct Lane {
  std::unique_ptr<model::M3Model> model;
  std::unique_ptr<engine::ModelRunner> runner;
  std::vector<engine::Sequence> seqs;
};

using MakeModel = std::function<std::unique_ptr<model::M3Model>(StepGraphs)>;

Lane make_lane(const MakeModel& make, StepGraphs mode, const std::vector<std::vector<int32_t>>& prompts,
               int max_tokens) {
  Lane l;
  l.model = make(mode);
  engine::CacheConfig cc = engine::cache_config_for(*l.model, max_tokens, static_cast<int32_t>(prompts.size()), 16);
  cc.prefix_caching = false;
  l.runner = std::make_unique<engine::ModelRunner>(*l.model, cc);
  l.seqs.resize(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    l.seqs[i].id = static_cast<int64_t>(i);
    l.seqs[i].tokens = prompts[i];
    l.seqs[i].num_prompt_tokens = static_cast<int32_t>(prompts[i].size());
    l.runner->admit(l.seqs[i]);
  }
  // Prefill every sequence in one (eager) step.
  std::vector<engine::StepItem> items;
  for (auto& s : l.seqs) items.push_back({&s, static_cast<int32_t>(s.tokens.size()), false});
  (void)l.runner->step(items, false);
  return l;
}

std::vector<float> slice_rows(const std::vector<float>& v, size_t rows, size_t vocab) {
  return {v.begin(), v.begin() + static_cast<ptrdiff_t>(rows * vocab)};
}

// Decodes `schedule` (each entry: the sequences of one step, in row order) on every lane, feeding all lanes the
// tokens lane 0 (StepGraphs::On) chose. When two lanes of the eager path disagree with each other (the eager path is
// not bit-reproducible), the replays are compared within `off_tol` instead of bit for bit, and the output says so.
// `capturable`: false for models whose routed experts are sorted on the host (float experts): their captures must
// fail and every decode step run padded and eagerly. `assert_plain`: whether the comparison with the plain
// (unpadded) eager path is asserted or only printed (see step_graphs_dummy).
void run_schedule(const std::string& name, const MakeModel& make, const std::vector<std::vector<int32_t>>& prompts,
                  const std::vector<std::vector<int>>& schedule, bool greedy, double off_tol, bool capturable = true,
                  bool assert_plain = true) {
  int max_tokens = 0;
  for (const auto& p : prompts) max_tokens = std::max(max_tokens, static_cast<int>(p.size()));
  max_tokens += static_cast<int>(schedule.size()) + 1;
  if (trace()) std::printf("trace %s: prefill of 4 lanes\n", name.c_str());
  Lane on = make_lane(make, StepGraphs::On, prompts, max_tokens);
  Lane padded = make_lane(make, StepGraphs::EagerPadded, prompts, max_tokens);
  Lane padded2 = make_lane(make, StepGraphs::EagerPadded, prompts, max_tokens);
  Lane off = make_lane(make, StepGraphs::Off, prompts, max_tokens);
  const size_t V = static_cast<size_t>(on.model->vocab_size());
  const std::string mode = greedy ? " greedy ids" : " logits";

  // Every sequence's first decoded token is a fixed one (the prefill's logits are not kept); later ones are lane
  // 0's choices.
  std::vector<int32_t> next(prompts.size(), 1);
  bool deterministic = true;
  size_t bits_bad = 0, ids_bad = 0, ids_off_bad = 0;
  double worst_replay = 0, worst_off = 0;
  size_t rows_checked = 0;
  // The padded and the plain eager path round differently (GEMMs of other row counts), so a near tie of the router
  // (top-k experts) can go either way and then the sequence's outputs rightly differ from there on. Both eager lanes
  // record their routing; a sequence counts as diverged from the first step whose experts differ for its row, and
  // only rows of sequences that have not diverged are compared with the plain path.
  using Routing = std::vector<std::vector<int32_t>>;  // per MoE layer call of the step: ids [rows, k]
  Routing route_padded, route_plain;
  const auto observe = [](Routing* r) {
    return [r](int, std::span<const int32_t> ids, int) { r->emplace_back(ids.begin(), ids.end()); };
  };
  padded.model->set_routing_observer(observe(&route_padded));
  off.model->set_routing_observer(observe(&route_plain));
  std::vector<bool> diverged(prompts.size(), false);
  size_t rows_compared = 0;
  for (size_t step = 0; step < schedule.size(); ++step) {
    const auto& which = schedule[step];
    route_padded.clear();
    route_plain.clear();
    engine::StepOutput out[4];
    Lane* lanes[4] = {&on, &padded, &padded2, &off};
    for (int li = 0; li < 4; ++li) {
      std::vector<engine::StepItem> items;
      for (int s : which) {
        auto& seq = lanes[li]->seqs[static_cast<size_t>(s)];
        seq.tokens.push_back(next[static_cast<size_t>(s)]);
        items.push_back({&seq, 1, false});
      }
      if (trace()) std::printf("trace %s step %zu lane %d rows %zu\n", name.c_str(), step, li, items.size());
      std::fflush(stdout);
      out[li] = lanes[li]->runner->step(items, greedy);
      if (trace()) cudaDeviceSynchronize();
    }
    const size_t B = which.size();
    rows_checked += B;
    if (route_padded.size() != route_plain.size()) {
      report(false, name + mode + ": the eager lanes saw different MoE layer counts", 0, 0);
      return;
    }
    for (size_t l = 0; l < route_plain.size(); ++l) {
      const size_t k = route_plain[l].size() / B;
      for (size_t r = 0; r < B; ++r) {
        std::vector<int32_t> x(route_plain[l].begin() + static_cast<ptrdiff_t>(r * k),
                               route_plain[l].begin() + static_cast<ptrdiff_t>((r + 1) * k));
        std::vector<int32_t> y(route_padded[l].begin() + static_cast<ptrdiff_t>(r * k),
                               route_padded[l].begin() + static_cast<ptrdiff_t>((r + 1) * k));
        std::sort(x.begin(), x.end());
        std::sort(y.begin(), y.end());
        if (x != y) diverged[static_cast<size_t>(which[r])] = true;
      }
    }
    if (greedy) {
      for (size_t r = 0; r < B; ++r) {
        ids_bad += out[0].tokens[r] != out[1].tokens[r];
        if (diverged[static_cast<size_t>(which[r])]) continue;
        ++rows_compared;
        ids_off_bad += out[0].tokens[r] != out[3].tokens[r];
        if (out[1].tokens[r] != out[2].tokens[r]) deterministic = false;
        next[static_cast<size_t>(which[r])] = out[0].tokens[r];
      }
      continue;
    }
    const auto a = slice_rows(out[0].logits, B, V), b = slice_rows(out[1].logits, B, V),
               b2 = slice_rows(out[2].logits, B, V), c = slice_rows(out[3].logits, B, V);
    for (size_t i = 0; i < a.size(); ++i) {
      bits_bad += std::bit_cast<uint32_t>(a[i]) != std::bit_cast<uint32_t>(b[i]);
      if (std::bit_cast<uint32_t>(b[i]) != std::bit_cast<uint32_t>(b2[i])) deterministic = false;
    }
    worst_replay = std::max(worst_replay, rel_err(a, b));
    for (size_t r = 0; r < B; ++r) {
      if (diverged[static_cast<size_t>(which[r])]) continue;
      ++rows_compared;
      const std::vector<float> ar(a.begin() + static_cast<ptrdiff_t>(r * V),
                                  a.begin() + static_cast<ptrdiff_t>((r + 1) * V));
      const std::vector<float> cr(c.begin() + static_cast<ptrdiff_t>(r * V),
                                  c.begin() + static_cast<ptrdiff_t>((r + 1) * V));
      worst_off = std::max(worst_off, rel_err(ar, cr));
    }
    for (size_t r = 0; r < B; ++r) {
      const float* row = a.data() + r * V;
      next[static_cast<size_t>(which[r])] = static_cast<int32_t>(std::max_element(row, row + V) - row);
    }
  }
  const model::StepGraphStats& st = on.model->step_graph_stats();
  std::printf(
      "info %s%s: %zu steps, %zu rows; graphs captured %llu, replays %llu, padded eager %llu, failures %llu; "
      "eager path deterministic: %s; vs plain eager: %zu rows compared, %zu sequences whose routing diverged\n",
      name.c_str(), mode.c_str(), schedule.size(), rows_checked, static_cast<unsigned long long>(st.captures),
      static_cast<unsigned long long>(st.replays), static_cast<unsigned long long>(st.padded_eager),
      static_cast<unsigned long long>(st.capture_failures), deterministic ? "yes" : "no", rows_compared,
      static_cast<size_t>(std::count(diverged.begin(), diverged.end(), true)));
  // At least half the rows are compared with the plain path (routing flips stay rare).
  report(rows_compared * 2 >= rows_checked, name + mode + ": rows compared with plain eager (routing not diverged)",
         static_cast<double>(rows_compared), static_cast<double>(rows_checked));
  if (capturable) {
    report(st.capture_failures == 0 && st.captures > 0 && st.replays > 0, name + mode + ": steps captured and replayed",
           static_cast<double>(st.replays), 0);
  } else {
    report(st.capture_failures > 0 && st.captures == 0 && st.replays == 0 && st.padded_eager == schedule.size(),
           name + mode + ": host-sorted experts are not captured (padded eager)",
           static_cast<double>(st.capture_failures), 0);
  }
  if (greedy) {
    report(ids_bad == 0 || !deterministic, name + mode + ": graph == padded eager (tokens)",
           static_cast<double>(ids_bad), 0);
    if (assert_plain) {
      report(ids_off_bad == 0, name + mode + ": graph == plain eager (tokens)", static_cast<double>(ids_off_bad), 0);
    } else {
      std::printf("info %s%s: graph vs plain eager: %zu of %zu compared tokens differ (not asserted)\n", name.c_str(),
                  mode.c_str(), ids_off_bad, rows_compared);
    }
    return;
  }
  if (deterministic) {
    report(bits_bad == 0, name + mode + ": graph == padded eager (bit-exact)", static_cast<double>(bits_bad), 0);
  } else {
    // Two runs of the eager path differ (atomic split-K adds of the MoE GEMV): bits cannot be asserted.
    std::printf("info %s: the eager path is not bit-reproducible itself; graph vs padded eager %.3g\n", name.c_str(),
                worst_replay);
    report(worst_replay <= off_tol, name + mode + ": graph vs padded eager (eager not deterministic)", worst_replay,
           off_tol);
  }
  if (assert_plain) {
    report(worst_off <= off_tol, name + mode + ": graph vs plain eager", worst_off, off_tol);
  } else {
    std::printf("info %s%s: graph vs plain eager: max relative error %.3g over %zu compared rows (not asserted)\n",
                name.c_str(), mode.c_str(), worst_off, rows_compared);
  }
}

// A schedule that changes the batch between replays: sizes 3 and 4 (bucket 4, one padding row), 2, 5..8 (bucket 8),
// 1, sequences in another row order, and enough steps for the longer sequences to cross page boundaries.
std::vector<std::vector<int>> mixed_schedule(int long_steps) {
  std::vector<std::vector<int>> s = {{0, 1, 2},          {0, 1, 2}, {3, 1, 0, 2},       {1, 4},   {0, 1, 2, 3, 4},
                                     {5, 4, 3, 2, 1, 0}, {2},       {0, 1, 2, 3, 4, 5}, {4, 0, 2}};
  for (int i = 0; i < long_steps; ++i)
    s.push_back(i % 3 == 0 ? std::vector<int>{0, 5, 3} : std::vector<int>{5, 0, 3, 1});
  return s;
}

std::vector<std::vector<int32_t>> prompts_of(const std::vector<int>& lengths, int vocab, uint32_t seed) {
  std::vector<std::vector<int32_t>> p;
  uint32_t x = seed;
  for (int n : lengths) {
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (auto& v : t) {
      x = x * 1664525u + 1013904223u;
      v = static_cast<int32_t>((x >> 8) % static_cast<uint32_t>(vocab));
    }
    p.push_back(std::move(t));
  }
  return p;
}

io::ModelConfig graph_config_file(const fs::path& fixtures, const std::string& name) {
  std::ifstream in(fixtures / "configs" / name);
  return io::parse_model_config(nlohmann::json::parse(in), name);
}

}  // namespace

MXLM_GPU_CHECK(step_graphs_fixtures) {
  for (const std::string name : {"dense", "mixed", "moe16", "mixed_mxfp4"}) {
    const fs::path dir = env.fixtures / "m3" / name;
    const MakeModel make = [&](StepGraphs mode) {
      model::ModelOptions o;
      o.step_graphs = mode;
      return model::load_m3_model(dir, env.gpu, o);
    };
    auto probe = make(StepGraphs::Off);
    const int bs = probe->has_sparse_layers() ? probe->text().sparse.block_size : 16;
    const int vocab = probe->vocab_size();
    const std::vector<bool> probe_moe = probe->text().layer_is_moe;
    probe.reset();
    // Contexts just below a page boundary (they cross it during the schedule), one short, one long.
    bool moe = false;
    for (bool m : probe_moe) moe = moe || m;
    const auto prompts = prompts_of({bs - 2, 2 * bs - 1, 3, bs + 1, 5, 3 * bs - 3}, vocab, 7);
    const double tol = name == "mixed_mxfp4" ? 2e-2 : 1e-4;
    // The float-expert fixtures' MoE sorts tokens on the host (cuda_moe.cpp): not capturable.
    const bool capturable = !moe || name == "mixed_mxfp4";
    for (bool greedy : {false, true})
      run_schedule("model " + name, make, prompts, mixed_schedule(2 * bs + 2), greedy, tol, capturable);
  }
}

MXLM_GPU_CHECK(step_graphs_dummy) {
  // Full-size layers of the real config (dummy weights): 0-2 (dense MLP, full attention) and 3-4 (MoE MXFP4, sparse
  // attention), prompts around the 128-token page.
  io::ModelConfig full = graph_config_file(env.fixtures, "minimax_m3_mxfp4_quark.json");
  // MXLM_GRAPH_CHECK_FIRST_LAYER=3: only the MoE layers.
  const char* only = std::getenv("MXLM_GRAPH_CHECK_FIRST_LAYER");
  for (const auto& [first, count] : {std::pair{0, 3}, std::pair{3, 2}}) {
    if (only && std::atoi(only) != first) continue;
    const io::ModelConfig c = model::slice_layers(full, first, count);
    const MakeModel make = [&](StepGraphs mode) {
      model::ModelOptions o;
      o.step_graphs = mode;
      return model::make_dummy_m3_model(c, env.gpu, o, 5);
    };
    const auto prompts = prompts_of({126, 200, 3, 129, 40, 255}, c.text.vocab_size, 11);
    const std::string name = "dummy layers " + std::to_string(first) + "-" + std::to_string(first + count - 1);
    // The MoE layers quantize-dequantize their activations to MXFP4 (a step function) and route to the top 4 of 128
    // experts, so the plain path's other GEMM row counts (other rounding) move whole QDQ steps and router ties: H100,
    // 2026-11-26: max relative error 0.164 and 2 of 32 greedy tokens apart on rows whose experts agreed, while the
    // replays equal the padded eager path bit for bit. Printed, not asserted; layers 0-2 are asserted (0.005).
    const bool moe_layers = first >= 3;
    for (bool greedy : {false, true})
      run_schedule(name, make, prompts, mixed_schedule(4), greedy, 2e-2, true, !moe_layers);
  }
}

}  // namespace mxlm::gpucheck
