// `mxlm bench <what>`: benchmark drivers that run the library end to end. `serve` is here; `kernels` and
// `quantize` are sub-subcommands for others to add next to it (the Google Benchmark binaries in bench/ measure
// single kernels).
//
// `mxlm bench serve --model DIR`: for each concurrency C, first the engine alone (the scheduler stepping on one
// thread, as the server's engine thread, max C sequences, the same random token prompts) gives the offline batch
// throughput; then an in-process `mxlm serve` on a free port of 127.0.0.1 gets C streaming /v1/completions clients (one
// HTTP connection each) and the output-token throughput, time to first token and inter-token latency are measured on
// the client side. The ratio server / offline throughput is the cost of HTTP, JSON, detokenization and the thread
// handoffs.
//
// `mxlm bench decode (--model DIR | --model-config CONFIG --load-format dummy) [--layers N] --batch 1,32`: decode
// tokens/s against the weight-bytes roofline (engine/decode_bench.h), e.g. the real MiniMax-M3 config with its first
// 4 layers and random weights made on the GPU.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include "server/http.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "backend/backend.h"
#include "cli/model_options.h"
#include "cli/registry.h"
#include "core/error.h"
#include "core/log.h"
#include "engine/decode_bench.h"
#include "engine/model_runner.h"
#include "engine/scheduler.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "model/dummy_weights.h"
#include "model/m3_model.h"
#include "server/openai_server.h"
#include "text/tokenizer.h"

namespace mxlm::cli {

namespace {

using Clock = std::chrono::steady_clock;

struct BenchServeOptions {
  std::string model;
  std::string device = "cpu";
  std::string dtype = "auto";
  std::vector<int> concurrency = {1, 4, 16};
  int num_prompts = 32;
  int input_len = 64;
  int output_len = 32;
  int block_size = 0;  // 0: the model's sparse block size (or 128)
  int max_num_batched_tokens = 2048;
  uint32_t seed = 0;
  std::string output_json;
};

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const double idx = p / 100.0 * static_cast<double>(v.size() - 1);
  const auto lo = static_cast<size_t>(idx);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (idx - static_cast<double>(lo));
}

std::vector<std::vector<int32_t>> random_prompts(int count, int len, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::vector<int32_t>> out(static_cast<size_t>(count));
  for (auto& p : out) {
    p.resize(static_cast<size_t>(len));
    for (auto& t : p) t = static_cast<int32_t>(16 + rng() % static_cast<uint32_t>(vocab - 16));
  }
  return out;
}

struct ClientResult {
  double ttft = 0.0;
  std::vector<double> itl;
  std::string error;
  int tokens = 0;  // from the usage chunk
  int chunks = 0;  // a chunk may carry several tokens when the client reads slower than the engine steps
  bool ok = false;
};

ClientResult stream_one(int port, const std::string& model, const std::vector<int32_t>& prompt, int max_tokens) {
  ClientResult r;
  httplib::Client cli("127.0.0.1", port);
  cli.set_read_timeout(600, 0);
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.set_header("Content-Type", "application/json");
  req.body = nlohmann::json{{"model", model},
                            {"prompt", prompt},
                            {"max_tokens", max_tokens},
                            {"temperature", 0},
                            {"stream", true},
                            {"ignore_eos", true},
                            {"stream_options", {{"include_usage", true}}}}
                 .dump();
  const auto t0 = Clock::now();
  auto last = t0;
  std::string buffer;
  req.content_receiver = [&](const char* data, size_t len, uint64_t, uint64_t) {
    buffer.append(data, len);
    size_t end;
    while ((end = buffer.find("\n\n")) != std::string::npos) {
      const std::string event = buffer.substr(0, end);
      buffer.erase(0, end + 2);
      if (event.rfind("data: ", 0) != 0 || event == "data: [DONE]") continue;
      const auto j = nlohmann::json::parse(event.substr(6), nullptr, false);
      if (j.is_discarded()) continue;
      if (j.contains("usage") && j["usage"].is_object()) r.tokens = j["usage"].value("completion_tokens", 0);
      if (!j.contains("choices") || j["choices"].empty()) continue;
      const auto now = Clock::now();
      if (r.chunks++ == 0)
        r.ttft = std::chrono::duration<double>(now - t0).count();
      else
        r.itl.push_back(std::chrono::duration<double>(now - last).count());
      last = now;
    }
    return true;
  };
  auto res = cli.send(req);
  r.ok = res && res->status == 200;
  if (!r.ok) r.error = res ? fmt::format("HTTP {}: {}", res->status, buffer) : httplib::to_string(res.error());
  return r;
}

void run_bench_serve(const BenchServeOptions& o) {
  if (o.num_prompts <= 0 || o.input_len <= 0 || o.output_len <= 0)
    fail("--num-prompts, --input-len and --output-len must be positive");
  for (const int c : o.concurrency)
    if (c <= 0) fail("--concurrency values must be positive");
  auto tokenizer = text::Tokenizer::load(o.model);
  auto be = make_backend(o.device);
  model::ModelOptions mo;
  mo.float_format = parse_weight_dtype(o.dtype);
  auto model = model::load_m3_model(o.model, *be, mo);
  // Prompt ids the model and the tokenizer both know.
  const int vocab = std::min<int>(model->vocab_size(), static_cast<int>(tokenizer.vocab_size()));
  const int max_c = *std::max_element(o.concurrency.begin(), o.concurrency.end());
  const int seq_len = o.input_len + o.output_len;
  engine::CacheConfig cache = engine::cache_config_for(*model, seq_len, max_c, o.block_size > 0 ? o.block_size : 128);
  if (o.block_size > 0 && !model->has_sparse_layers()) cache.block_size = o.block_size;
  cache.num_pages = engine::pages_for(seq_len, cache.block_size) * max_c;
  cache.prefix_caching = false;  // every run sees fresh prompts anyway; keep the two sides comparable
  engine::ModelRunner runner(*model, cache);
  const std::string name = "bench";

  nlohmann::json report = nlohmann::json::array();
  fmt::print("{:>5} {:>12} {:>12} {:>8} {:>10} {:>10} {:>10} {:>10}\n", "conc", "offline t/s", "server t/s", "ratio",
             "TTFT p50", "TTFT p99", "ITL p50", "ITL p99");
  uint32_t seed = o.seed;
  for (const int c : o.concurrency) {
    engine::SchedulerConfig sc;
    sc.max_num_seqs = c;
    sc.max_num_batched_tokens = o.max_num_batched_tokens;
    sc.max_model_len = seq_len;
    sc.max_waiting = o.num_prompts + 1;

    // Offline: the engine alone, stepping on this thread.
    double offline_tps = 0.0;
    {
      engine::Scheduler sched(runner, sc);
      const auto prompts = random_prompts(o.num_prompts, o.input_len, vocab, seed++);
      std::vector<std::shared_ptr<engine::RequestStream>> streams;
      const auto t0 = Clock::now();
      for (const auto& p : prompts) {
        engine::GenerationRequest r;
        r.prompt = p;
        r.params.temperature = 0.0f;
        r.params.max_tokens = o.output_len;
        streams.push_back(sched.submit(std::move(r)));
      }
      // On its own thread, as the server's engine thread (OpenMP teams of the main thread behave differently).
      std::thread engine_thread([&] {
        while (sched.step()) {
        }
      });
      engine_thread.join();
      const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
      offline_tps = static_cast<double>(sched.stats().generation_tokens) / secs;
    }

    // Server: C clients, each sending its share of the prompts one after another.
    engine::Scheduler sched(runner, sc);
    server::ServerConfig cfg;
    cfg.port = 0;
    cfg.served_model_name = name;
    cfg.max_model_len = seq_len;
    cfg.num_threads = c + 8;
    server::OpenAIServer srv(cfg, tokenizer, std::nullopt, sched);
    sched.start();
    std::thread listener([&] { srv.listen(); });
    while (!srv.running()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    const auto prompts = random_prompts(o.num_prompts, o.input_len, vocab, seed++);
    std::vector<ClientResult> results(prompts.size());
    std::atomic<size_t> next{0};
    const auto t0 = Clock::now();
    std::vector<std::thread> clients;
    for (int i = 0; i < c; ++i)
      clients.emplace_back([&] {
        for (size_t k; (k = next++) < prompts.size();)
          results[k] = stream_one(srv.port(), name, prompts[k], o.output_len);
      });
    for (auto& t : clients) t.join();
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    srv.stop();
    listener.join();
    sched.stop();

    std::vector<double> ttft, itl;
    int tokens = 0, failed = 0;
    for (const auto& r : results) {
      if (!r.ok) ++failed;
      ttft.push_back(r.ttft);
      itl.insert(itl.end(), r.itl.begin(), r.itl.end());
      tokens += r.tokens;
    }
    if (failed) {
      std::string first;
      for (const auto& r : results)
        if (!r.ok) first = r.error;
      fail("{} of {} benchmark requests failed, e.g. {}", failed, results.size(), first);
    }
    const double server_tps = tokens / secs;
    fmt::print("{:>5} {:>12.1f} {:>12.1f} {:>8.3f} {:>9.1f}ms {:>9.1f}ms {:>9.2f}ms {:>9.2f}ms\n", c, offline_tps,
               server_tps, server_tps / offline_tps, 1e3 * percentile(ttft, 50), 1e3 * percentile(ttft, 99),
               1e3 * percentile(itl, 50), 1e3 * percentile(itl, 99));
    report.push_back({{"concurrency", c},
                      {"offline_tokens_per_s", offline_tps},
                      {"server_tokens_per_s", server_tps},
                      {"server_over_offline", server_tps / offline_tps},
                      {"ttft_p50_s", percentile(ttft, 50)},
                      {"ttft_p99_s", percentile(ttft, 99)},
                      {"itl_p50_s", percentile(itl, 50)},
                      {"itl_p99_s", percentile(itl, 99)},
                      {"requests", results.size()},
                      {"output_tokens", tokens}});
  }
  if (!o.output_json.empty()) {
    std::ofstream out(o.output_json);
    out << report.dump(2) << "\n";
  }
}

struct BenchDecodeOptions {
  std::string model;         // a model directory (config.json + weights unless --load-format dummy)
  std::string model_config;  // or config.json (a file or a directory holding one), with --load-format dummy
  std::string load_format = "auto";
  int layers = 0;  // 0: all
  int first_layer = 0;
  std::string device = "cpu";
  std::string moe_backend = kDefaultMoeBackend;
  std::string dtype = "auto";
  std::string kv_cache_dtype = "auto";
  int tensor_parallel_size = 1;
  std::vector<int> batch = {1, 32};
  engine::DecodeBenchOptions run;
  double copy_mib = 1024;
  std::string output_json;
  bool enforce_eager = false;  // else, where the backend captures decode steps, each batch runs captured and eager
};

void run_bench_decode(const BenchDecodeOptions& o) {
  if (o.load_format != "auto" && o.load_format != "dummy")
    fail("--load-format must be auto or dummy, got '{}'", o.load_format);
  if (o.model.empty() == o.model_config.empty()) fail("give exactly one of --model DIR and --model-config CONFIG");
  if (!o.model_config.empty() && o.load_format != "dummy")
    fail("--model-config has no weights: use it with --load-format dummy (or give --model DIR)");
  for (const int b : o.batch)
    if (b <= 0) fail("--batch values must be positive");
  const std::filesystem::path config_path(o.model.empty() ? o.model_config : o.model);
  io::ModelConfig config;
  if (std::filesystem::is_directory(config_path)) {
    config = io::load_model_config(config_path);
  } else {
    std::ifstream in(config_path);
    if (!in) fail("cannot open model config {}", config_path.string());
    const auto j = nlohmann::json::parse(in, nullptr, false);
    if (j.is_discarded()) fail("{} is not valid JSON", config_path.string());
    config = io::parse_model_config(j, config_path.string());
  }
  const int all_layers = config.text.num_layers;
  if (o.layers > 0 || o.first_layer > 0)
    config = model::slice_layers(config, o.first_layer, o.layers > 0 ? o.layers : all_layers - o.first_layer);
  if (o.load_format != "dummy" && config.text.num_layers != all_layers)
    fail("--layers / --first-layer need --load-format dummy (a checkpoint's weights are for all its layers)");

  model::ModelOptions mo;
  mo.float_format = parse_weight_dtype(o.dtype);
  mo.step_graphs = o.enforce_eager ? model::StepGraphs::Off : model::StepGraphs::On;
  const auto t0 = Clock::now();
  // Every rank loads its shard (with dummy weights, of the same seed).
  const auto load_rank = [&](backend::Backend& rank_be, const model::ModelOptions& rank_mo) {
    if (o.load_format == "dummy") return model::make_dummy_m3_model(config, rank_be, rank_mo, o.run.seed);
    return std::make_unique<model::M3Model>(config, io::Checkpoint(o.model), rank_be, rank_mo);
  };
  LoadedModel lm = load_model(o.device, o.moe_backend, o.tensor_parallel_size, mo, load_rank, o.kv_cache_dtype);
  auto& m = lm.model;
  auto& be = lm.backend;
  engine::DecodeBenchOptions run = o.run;
  run.tp_ranks = lm.ranks.get();
  const double load_s = std::chrono::duration<double>(Clock::now() - t0).count();
  const model::WeightBytes& wb = m->weight_bytes_by_kind();
  int moe = 0, sparse = 0;
  for (int l = 0; l < m->num_layers(); ++l) {
    moe += config.text.layer_is_moe[static_cast<size_t>(l)] ? 1 : 0;
    sparse += m->layer_is_sparse(l) ? 1 : 0;
  }
  fmt::print("model: {} layers from layer {} ({} MoE, {} sparse-attention), {} weights ({:.2f} GB; embedding {:.2f} GB, "
             "routed experts {:.2f} GB, one expert {:.1f} MB), loaded in {:.1f} s on {}\n",
             m->num_layers(), o.first_layer, moe, sparse, o.load_format == "dummy" ? "dummy" : "checkpoint",
             wb.total / 1e9, wb.embedding / 1e9, wb.routed_experts / 1e9, wb.one_expert / 1e6, load_s, be->name());
  const double bw = engine::measure_copy_bandwidth(*be, static_cast<size_t>(o.copy_mib * 1048576.0));
  fmt::print("copy bandwidth (backend copy of {:.0f} MiB, read + write): {:.1f} GB/s\n", o.copy_mib, bw / 1e9);
  // Decode steps as CUDA graphs (model/step_graphs.h) where the backend has them: each batch then runs twice, captured
  // and eager (--enforce-eager: eager only), and the graph's gain is the ratio of the two in one process.
  const bool both = !o.enforce_eager && be->supports_step_graphs();
  fmt::print("{:>5} {:>5} {:>9} {:>9} {:>9} {:>10} {:>8} {:>9} {:>8} {:>9} {:>9} {:>8} {:>9}\n", "batch", "mode", "ctx",
             "step p50", "p10-p90", "tokens/s", "experts", "weights", "KV", "roofline", "roof t/s", "ratio",
             "host smp");
  nlohmann::json report = nlohmann::json::array();
  for (const int b : o.batch) {
    double graph_step_s = 0;
    for (const bool eager : both ? std::vector<bool>{false, true} : std::vector<bool>{true}) {
      run.enforce_eager = eager;
      const engine::DecodeBenchResult r = engine::run_decode_bench(*m, b, run, bw);
      const char* mode = run.enforce_eager ? "eager" : "graph";
      if (!run.enforce_eager && r.graph_replays == 0)
        fmt::print("warning: no timed step replayed a graph (the step did not qualify or its capture failed)\n");
      fmt::print(
          "{:>5} {:>5} {:>4}-{:<4} {:>7.3f}ms {:>4.2f}-{:<4.2f} {:>10.1f} {:>8.1f} {:>7.3f}GB {:>6.1f}MB {:>7.3f}ms "
          "{:>9.1f} {:>8.3f} {:>7.3f}ms\n",
          b, mode, r.context_first, r.context_last, r.step_p50_s * 1e3, r.step_p10_s * 1e3, r.step_p90_s * 1e3,
          r.tokens_per_s, r.distinct_experts, r.weight_bytes / 1e9, r.kv_bytes / 1e6, r.roofline_s * 1e3,
          b / r.roofline_s, r.roofline_fraction, r.host_argmax_s * 1e3);
      if (!run.enforce_eager) graph_step_s = r.step_p50_s;
      if (both && run.enforce_eager)
        fmt::print("{:>5} graph vs eager: step {:.3f} / {:.3f} ms = {:.3f}x tokens/s\n", b, graph_step_s * 1e3,
                   r.step_p50_s * 1e3, r.step_p50_s / graph_step_s);
      report.push_back({{"batch", b},
                        {"mode", mode},
                        {"graph_replays", r.graph_replays},
                        {"context_first", r.context_first},
                        {"context_last", r.context_last},
                        {"prefill_s", r.prefill_s},
                        {"step_p10_s", r.step_p10_s},
                        {"step_p50_s", r.step_p50_s},
                        {"step_p90_s", r.step_p90_s},
                        {"tokens_per_s", r.tokens_per_s},
                        {"distinct_experts_per_moe_layer", r.distinct_experts},
                        {"weight_bytes_per_step", r.weight_bytes},
                        {"kv_bytes_per_step", r.kv_bytes},
                        {"logits_bytes_per_step", r.logits_bytes},
                        {"copy_bytes_per_s", bw},
                        {"roofline_weights_s", r.roofline_weights_s},
                        {"roofline_s", r.roofline_s},
                        {"roofline_fraction", r.roofline_fraction},
                        {"host_argmax_s", r.host_argmax_s}});
    }
  }
  if (!o.output_json.empty()) {
    std::ofstream out(o.output_json);
    out << report.dump(2) << "\n";
  }
}

void add_bench_decode(CLI::App* bench) {
  auto o = std::make_shared<BenchDecodeOptions>();
  auto* d = bench->add_subcommand("decode", "Decode tokens/s at fixed batch sizes vs the weight-bytes roofline");
  d->add_option("--model", o->model, "Model directory");
  d->add_option("--model-config", o->model_config, "config.json (file or directory) for --load-format dummy");
  d->add_option("--load-format", o->load_format, "auto (the checkpoint) or dummy (random weights made by the backend)")
      ->capture_default_str();
  d->add_option("--layers", o->layers, "Keep this many layers (0: all), with their real dense/MoE and full/sparse kinds");
  d->add_option("--first-layer", o->first_layer, "First kept layer (e.g. 3: MiniMax-M3's MoE/sparse layers only)");
  d->add_option("--device", o->device)->capture_default_str();
  add_moe_backend_option(*d, o->moe_backend);
  d->add_option("--tensor-parallel-size", o->tensor_parallel_size,
                "Ranks the model is sharded over (threads on cpu, GPUs 0..N-1 with NCCL on cuda); numbers are rank 0's")
      ->capture_default_str();
  d->add_option("--dtype", o->dtype, "auto, float32 or bfloat16 (float weights)")->capture_default_str();
  d->add_option("--batch", o->batch, "Sequences decoded together (several values: several runs)")
      ->delimiter(',')
      ->capture_default_str();
  d->add_option("--prompt-len", o->run.prompt_len, "Prompt tokens per sequence (prefilled first)")->capture_default_str();
  d->add_flag("--device-greedy,--device-sampling", o->run.device_greedy,
              "Sample on the device (token ids come back, not logits); default: logits to the host");
  d->add_option("--temperature", o->run.temperature, "Sampling temperature of the decode steps (0: greedy)")
      ->capture_default_str();
  d->add_option("--top-p", o->run.top_p)->capture_default_str();
  d->add_option("--top-k", o->run.top_k)->capture_default_str();
  d->add_option("--kv-cache-dtype", o->kv_cache_dtype, "KV cache element: auto (float32), float32, bfloat16 (cuda)")
      ->capture_default_str();
  d->add_option("--warmup-steps", o->run.warmup_steps, "Untimed decode steps (their routing counts the experts)")
      ->capture_default_str();
  d->add_option("--steps", o->run.steps, "Timed decode steps")->capture_default_str();
  d->add_option("--seed", o->run.seed, "Seed of the prompts and the dummy weights")->capture_default_str();
  d->add_option("--copy-mib", o->copy_mib, "Size of the copy that measures the bandwidth")->capture_default_str();
  d->add_option("--output-json", o->output_json, "Also write the numbers as JSON");
  d->add_flag("--enforce-eager", o->enforce_eager,
              "Decode steps eagerly only (default on cuda: each batch captured as a CUDA graph and eager, compared)");
  d->callback([o] { run_bench_decode(*o); });
}

void add_bench(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "Benchmarks of whole code paths (serve, decode)");
  bench->require_subcommand(1);
  add_bench_decode(bench);
  auto o = std::make_shared<BenchServeOptions>();
  auto* serve = bench->add_subcommand("serve", "Server throughput/latency vs the engine's offline batch throughput");
  serve->add_option("--model", o->model, "Model directory (with tokenizer.json)")->required();
  serve->add_option("--device", o->device)->capture_default_str();
  serve->add_option("--dtype", o->dtype, "auto, float32 or bfloat16")->capture_default_str();
  serve->add_option("--concurrency", o->concurrency, "Concurrent clients (several values: several runs)")
      ->delimiter(',')
      ->capture_default_str();
  serve->add_option("--num-prompts", o->num_prompts, "Requests per run")->capture_default_str();
  serve->add_option("--input-len", o->input_len, "Prompt tokens")->capture_default_str();
  serve->add_option("--output-len", o->output_len, "Generated tokens per request")->capture_default_str();
  serve->add_option("--block-size", o->block_size, "KV page size (default: the sparse block size, else 128)");
  serve->add_option("--max-num-batched-tokens", o->max_num_batched_tokens)->capture_default_str();
  serve->add_option("--seed", o->seed, "Prompt RNG seed")->capture_default_str();
  serve->add_option("--output-json", o->output_json, "Also write the numbers as JSON");
  serve->callback([o] { run_bench_serve(*o); });
}

const bool registered = register_command("bench", add_bench);

}  // namespace
}  // namespace mxlm::cli
