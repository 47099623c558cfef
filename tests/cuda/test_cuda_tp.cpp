// Tensor parallelism of the CUDA backend (cuda_tp.cpp, engine/tp_ranks.h) on 2 GPUs: the NCCL collectives against
// the CPU backend's thread group on the same random inputs (bit-exact: a sum of two terms and a gather have one
// answer), then the model fixtures at TP = 2 against TP = 1 on one GPU and against transformers' logits, prefill
// and decode, driven the way the CLI drives them (rank 0's ModelRunner, rank 1 on its own thread). With one GPU the
// check prints a skip line and counts nothing.
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <future>
#include <thread>

#include "backend/cpu/cpu_tp_group.h"
#include "backend/cuda/cuda_backend.h"
#include "core/error.h"
#include "engine/model_runner.h"
#include "engine/npy.h"
#include "engine/tp_ranks.h"
#include "gpu_check.h"
#include "model/m3_model.h"

namespace mxlm::gpucheck {
namespace {

constexpr int kRanks = 2;

// Rank r's CUDA backend (native MoE); to be called on the thread that drives the rank.
std::unique_ptr<Backend> rank_backend(const std::shared_ptr<backend::CudaTpGroup>& group, int r) {
  backend::CudaOptions options;  // by name: the struct grows
  options.tp = group;
  options.tp_rank = r;
  return backend::make_cuda_backend(options);
}

// Runs fn(rank, backend) on one thread per rank, each with the backend make(rank) built on that thread; returns
// the ranks' error messages (empty: none).
std::vector<std::string> on_ranks(const std::function<std::unique_ptr<Backend>(int)>& make,
                                  const std::function<void(int, Backend&)>& fn) {
  std::vector<std::string> errors(kRanks);
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r)
    threads.emplace_back([&, r] {
      try {
        auto be = make(r);
        fn(r, *be);
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  return errors;
}

bool report_errors(const std::string& what, const std::vector<std::string>& errors) {
  bool ok = true;
  for (size_t r = 0; r < errors.size(); ++r)
    if (!errors[r].empty()) {
      report(false, what + ": rank " + std::to_string(r) + ": " + errors[r], 0, 0);
      ok = false;
    }
  return ok;
}

struct Collective {
  bool gather = false;
  size_t rows = 0, cols = 0;                // all-reduce: rows x cols elements; gather: cols per rank
  std::vector<std::vector<float>> inputs;   // per rank
  std::vector<std::vector<float>> outputs;  // per rank
};

// Every case runs on every rank, in order, on the given backends; outputs per rank.
void run_collectives(std::vector<Collective>& cases, const std::function<std::unique_ptr<Backend>(int)>& make,
                     const std::string& what) {
  for (auto& c : cases) c.outputs.assign(kRanks, {});
  const auto errors = on_ranks(make, [&](int r, Backend& be) {
    for (auto& c : cases) {
      const auto& in = c.inputs[static_cast<size_t>(r)];
      auto x = up(be, in);
      if (c.gather) {
        auto out = be.alloc(c.rows * c.cols * kRanks);
        be.all_gather_cols(x->f32(), c.rows, c.cols, out->f32());
        c.outputs[static_cast<size_t>(r)] = down(be, *out, c.rows * c.cols * kRanks);
      } else {
        be.all_reduce_sum(x->f32(), in.size());
        c.outputs[static_cast<size_t>(r)] = down(be, *x, in.size());
      }
    }
  });
  report_errors(what, errors);
}

void test_collectives(const std::shared_ptr<backend::CudaTpGroup>& group) {
  std::vector<Collective> cases;
  for (size_t n : {size_t{1}, size_t{7}, size_t{6144}, size_t{8 * 6144 + 5}, size_t{1} << 22})
    cases.push_back({false, 1, n, {}, {}});
  for (auto [rows, cols] : std::vector<std::pair<size_t, size_t>>{{1, 1}, {1, 1000}, {3, 5}, {17, 1000}, {64, 4001}})
    cases.push_back({true, rows, cols, {}, {}});
  for (auto& c : cases)
    for (int r = 0; r < kRanks; ++r) c.inputs.push_back(randn(c.rows * c.cols));

  std::vector<Collective> want = cases;
  auto cpu = std::make_shared<std::vector<std::unique_ptr<Backend>>>(backend::cpu::make_cpu_tp_backends(kRanks));
  run_collectives(
      want, [cpu](int r) { return std::move((*cpu)[static_cast<size_t>(r)]); }, "cpu collectives");
  run_collectives(
      cases, [group](int r) { return rank_backend(group, r); }, "cuda collectives");
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto& c = cases[i];
    const std::string what =
        c.gather ? "all_gather_cols rows " + std::to_string(c.rows) + " x " + std::to_string(c.cols) + " per rank"
                 : "all_reduce_sum n " + std::to_string(c.cols);
    for (int r = 0; r < kRanks; ++r)
      check_bits(what + " rank " + std::to_string(r) + " vs cpu group", c.outputs[static_cast<size_t>(r)],
                 want[i].outputs[static_cast<size_t>(r)]);
  }
}

struct Reference {
  std::vector<int32_t> tokens;
  std::vector<float> logits;
};

Reference load_reference(const fs::path& dir) {
  std::ifstream f(dir / "reference.json");
  Reference r;
  r.tokens = nlohmann::json::parse(f).at("tokens").at(0).get<std::vector<int32_t>>();
  r.logits = engine::read_npy_f32(dir / "logits_0.npy").data;
  return r;
}

// Logits of every token: one prefill step (chunk 0) or one token per step (chunk 1).
std::vector<float> run_steps(model::M3Model& m, engine::TpRanks* ranks, const std::vector<int32_t>& tokens, int chunk) {
  engine::CacheConfig cc;
  cc.block_size = m.has_sparse_layers() ? m.text().sparse.block_size : 4;
  cc.num_pages = 64;
  cc.prefix_caching = false;
  engine::ModelRunner runner(m, cc);
  if (ranks) ranks->attach(runner);
  engine::Sequence seq;
  seq.tokens = tokens;
  runner.admit(seq);
  std::vector<float> all;
  while (seq.num_uncomputed() > 0) {
    const int32_t n = chunk > 0 ? std::min(chunk, seq.num_uncomputed()) : seq.num_uncomputed();
    engine::StepItem item{&seq, n, true};
    const auto out = runner.step({&item, 1});
    all.insert(all.end(), out.logits.begin(), out.logits.end());
  }
  return all;
}

void test_fixtures_tp(Env& env, const std::shared_ptr<backend::CudaTpGroup>& group) {
  const auto make = [group](int r) { return rank_backend(group, r); };
  for (const std::string name : {"dense", "mixed", "moe16", "mixed_mxfp4"}) {
    const fs::path dir = env.fixtures / "m3" / name;
    if (!fs::exists(dir / "reference.json")) {
      report(false, "fixture " + name + " missing", 0, 0);
      continue;
    }
    const Reference ref = load_reference(dir);
    const bool mx = name == "mixed_mxfp4";
    const double tol = mx ? 2e-2 : 1e-4;
    const auto load = [dir](Backend& be, int r) {
      model::ModelOptions o;
      o.tp = {r, kRanks};
      return model::load_m3_model(dir, be, o);
    };
    for (int chunk : {0, 1}) {
      const std::string what = "model " + name + (chunk == 0 ? " prefill" : " decode") + " TP 2";
      auto one = model::load_m3_model(dir, env.gpu);
      const auto tp1 = run_steps(*one, nullptr, ref.tokens, chunk);
      one.reset();
      std::vector<float> tp2;
      try {
        engine::TpRanks ranks(kRanks, make, load);
        auto be0 = make(0);
        auto m0 = load(*be0, 0);
        tp2 = run_steps(*m0, &ranks, ref.tokens, chunk);
      } catch (const Error& e) {
        // mixed_mxfp4's shared expert (32 intermediate rows) cannot be split over 2 ranks in whole 32-element MXFP4
        // scale blocks: the same clear error as on the CPU (tests/model/m3_tensor_parallel_test.cpp).
        const bool expected = mx && std::string(e.what()).find("cannot be split at column") != std::string::npos;
        report(expected, what + ": " + (expected ? "refused (MXFP4 shard not a whole scale block)" : e.what()), 0, 0);
        continue;
      }
      check_close(what + ": cuda vs transformers", tp2, ref.logits, tol);
      check_close(what + ": cuda TP 2 vs cuda TP 1", tp2, tp1, tol);
      if (chunk == 1 && name == "dense") {
        // Decode steps as CUDA graphs on both ranks (NCCL collectives captured in each rank's graph).
        const auto load_graphs = [dir](Backend& be, int r) {
          model::ModelOptions o;
          o.tp = {r, kRanks};
          o.step_graphs = model::StepGraphs::On;
          return model::load_m3_model(dir, be, o);
        };
        engine::TpRanks ranks(kRanks, make, load_graphs);
        auto be0 = make(0);
        auto m0 = load_graphs(*be0, 0);
        const auto graphs = run_steps(*m0, &ranks, ref.tokens, chunk);
        const model::StepGraphStats& st = m0->step_graph_stats();
        report(st.captures > 0 && st.replays > 0 && st.capture_failures == 0,
               what + " CUDA graphs: rank 0 captured and replayed", static_cast<double>(st.replays), 0);
        check_close(what + " CUDA graphs: vs transformers", graphs, ref.logits, tol);
        check_close(what + " CUDA graphs: vs TP 2 eager", graphs, tp2, tol);
      }
    }
  }
}

// A rank that fails in the middle of a step (MXLM_TP_INJECT_FAILURE: rank 1's second forward, before its first
// collective, as an out-of-memory error would) must make rank 0's step return that error instead of leaving rank 0's
// NCCL all-reduce waiting for rank 1 forever; later steps fail at once. Uses its own group (an aborted one is gone).
void test_rank_failure(Env& env) {
  auto group = backend::make_cuda_tp_group(kRanks);
  const auto make = [group](int r) { return rank_backend(group, r); };
  const fs::path dir = env.fixtures / "m3" / "dense";
  const auto load = [dir](Backend& be, int r) {
    model::ModelOptions o;
    o.tp = {r, kRanks};
    return model::load_m3_model(dir, be, o);
  };
  ::setenv("MXLM_TP_INJECT_FAILURE", "1:1", 1);
  engine::TpRanks ranks(kRanks, make, load);
  ::unsetenv("MXLM_TP_INJECT_FAILURE");
  auto be0 = make(0);
  auto m0 = load(*be0, 0);
  engine::ModelRunner runner(*m0, engine::cache_config_for(*m0, 64, 1));
  ranks.attach(runner);
  engine::Sequence a;
  a.id = 1;
  a.tokens = {1, 2, 3, 4, 5, 6, 7, 8};
  runner.admit(a);
  engine::StepItem first{&a, 4, false};
  runner.step({&first, 1});
  auto step = std::async(std::launch::async, [&] {
    engine::StepItem rest{&a, 4, false};
    try {
      runner.step({&rest, 1});
      return std::string("no error");
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
  });
  if (step.wait_for(std::chrono::seconds(60)) != std::future_status::ready) {
    report(false, "TP 2 rank failure: rank 0 still waits after 60 s (the process will hang)", 0, 0);
    std::fflush(stdout);
  }
  const std::string err = step.get();
  report(err.find("injected failure of rank 1") != std::string::npos,
         "TP 2 rank failure: rank 0's step fails with rank 1's reason: " + err, 0, 0);
  std::string again;
  try {
    engine::StepItem more{&a, 4, false};
    runner.step({&more, 1});
  } catch (const std::exception& e) {
    again = e.what();
  }
  report(again.find("aborted") != std::string::npos, "TP 2 rank failure: the next step fails at once: " + again, 0,
         0);
}

}  // namespace

MXLM_GPU_CHECK(tp_abort) {
  const int devices = backend::cuda_device_count();
  if (devices < kRanks) {
    std::printf("skip: needs 2 GPUs (%d present)\n", devices);
    return;
  }
  test_rank_failure(env);
}

MXLM_GPU_CHECK(tp) {
  const int devices = backend::cuda_device_count();
  if (devices < kRanks) {
    std::printf("skip: needs 2 GPUs (%d present)\n", devices);
    return;
  }
  auto group = backend::make_cuda_tp_group(kRanks);
  test_collectives(group);
  test_fixtures_tp(env, group);
}

}  // namespace mxlm::gpucheck
