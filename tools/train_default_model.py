"""Trains the bundled default model (models/default): a small MiniMax-M3 of the exact architecture, on the GPU machine.

Architecture (transformers 5.17 `MiniMaxM3SparseForConditionalGeneration`, config built with
tools/gen_m3_fixtures.py's upstream-style config): 5 layers, hidden 256, 4 query / 2 KV heads of 64 with partial
RoPE over 32 dims, per-head q/k norms, Gemma (1 + w) norms everywhere; layers 0-1 full attention + dense swigluoai
MLP (as the real model's layers 0-2); layers 2-4 sparse attention with the lightning indexer (2 index heads of 32,
blocks of 32 tokens, top-8 blocks + the local block, so selection is active on the ~1000-token 5-shot prompts)
and MoE (8 routed experts of 256, top-2, sigmoid router with e_score_correction_bias, routed scaling 2.0, one
shared expert). Vocabulary: the byte-level BPE of tools/train_tokenizer.py (models/default/tokenizer.json).

Training: conversations from tools/gen_arith_data.py (5-shot multi-turn prompts exactly as `mxlm eval` sends,
<mm:think> chats, calculator tool calls), rendered with the real M3 chat template and tokenized with HF
tokenizers; loss on the assistant turns only (everything after `]~b]ai\\n` up to and including `[e~[`). AdamW, bf16
autocast, a wall-clock budget with warmup + cosine decay. The router bias is trained the auxiliary-loss-free way
(DeepSeek-V3): after every step, bias += 1e-3 * sign(mean load - expert load) per MoE layer.
The indexer's q/k projections get no gradient: transformers selects blocks with a hard top-k, so they keep
their random initialisation (selection is a fixed random-feature function of the hidden states, which the rest
of the model learns to live with). This is documented in the model card.

Export: the UPSTREAM MiniMaxAI layout (gen_m3_fixtures.to_upstream), BF16 except the F32 router weight and bias,
sharded into files under ~1.9 MB with a standard model.safetensors.index.json; reloaded with transformers'
from_pretrained (layout proof), then an accuracy check: greedy generation on held-out test problems with the same
5-shot prompts `mxlm eval --data-dir data/arith` builds (few-shot draws from random.Random(1234) over
data/arith/train.jsonl.xz), and reference logits of the reloaded model for tests/py/test_default_model.py.

Run on the GPU machine (no internet):  python3 tools/train_default_model.py --out $OUT --seconds 210
"""

import argparse
import json
import lzma
import math
import multiprocessing as mp
import os
import pickle
import random
import re
import sys
import tarfile
import time

import numpy as np
import torch
import torch.nn.functional as F

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)
import gen_arith_data as gad  # noqa: E402

MODEL_SRC = os.path.join(ROOT, "models", "default")

ARCH = dict(hidden_size=256, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            rotary_dim=32, dense_intermediate_size=768, intermediate_size=256, shared_intermediate_size=256,
            num_local_experts=8, num_experts_per_tok=2, moe_layer_freq=[0, 0, 1, 1, 1],
            sparse_freq=[0, 0, 1, 1, 1], block_size=32, topk_blocks=8, index_heads=2, index_dim=32)
VOCAB = 1152  # tokenizer has 1143 entries; rounded up to a multiple of 64
MAX_LEN = 1280
KIND_BATCH = {"fewshot": 24, "think": 96, "tool": 48}
KIND_WEIGHT = {"fewshot": 0.6, "think": 0.2, "tool": 0.2}
KIND_COUNT = {"fewshot": 12000, "think": 12000, "tool": 8000}


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ---------------------------------------------------------------- data

def _tokenizer():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(os.path.join(MODEL_SRC, "tokenizer.json"))


_PAD = []


def pad_id():
    """`]!p~[` (never a target; right padding only, so causal attention never sees it)."""
    if not _PAD:
        _PAD.append(_tokenizer().token_to_id("]!p~["))
    return _PAD[0]


def encode_with_mask(tok, text):
    """ids and a 0/1 loss mask: assistant replies (after `]~b]ai\\n`, through `[e~[`)."""
    enc = tok.encode(text, add_special_tokens=False)
    spans = []
    head = "]~b]ai\n"
    pos = 0
    while True:
        s = text.find(head, pos)
        if s < 0:
            break
        e = text.find("[e~[", s)
        e = len(text) if e < 0 else e + len("[e~[")
        spans.append((s + len(head), e))
        pos = e
    mask = np.zeros(len(enc.ids), dtype=np.uint8)
    for i, (a, b) in enumerate(enc.offsets):
        for s, e in spans:
            if a >= s and b <= e:
                mask[i] = 1
                break
    return np.array(enc.ids, dtype=np.int32), mask


def _gen_worker(job):
    kind, seed, n = job
    test = gad.test_problems()
    exclude = {p.question for p in test}
    pool = gad.few_shot_pool(exclude)
    render = gad.Renderer(os.path.join(MODEL_SRC, "chat_template.jinja"))
    tok = _tokenizer()
    r = random.Random(seed)
    stream = gad.train_stream(seed * 7919 + 1, exclude)
    out = []
    for _ in range(n):
        ids, mask = encode_with_mask(tok, gad.training_text(kind, r, stream, pool, render))
        if len(ids) <= MAX_LEN:
            out.append((ids, mask))
    return kind, out


def make_data(procs):
    jobs = []
    seed = 1000
    for kind, total in KIND_COUNT.items():
        per = total // procs
        for _ in range(procs):
            seed += 1
            jobs.append((kind, seed, per))
    data = {k: [] for k in KIND_COUNT}
    with mp.get_context("fork").Pool(procs) as pool:
        for kind, out in pool.imap_unordered(_gen_worker, jobs):
            data[kind].extend(out)
    for k, v in data.items():
        lens = [len(x[0]) for x in v]
        log(f"data {k}: {len(v)} conversations, tokens mean {np.mean(lens):.0f} max {max(lens)}, "
            f"loss tokens {sum(int(m.sum()) for _, m in v)}")
    return data


def batch_of(examples, device):
    L = max(len(x[0]) for x in examples)
    ids = torch.full((len(examples), L), pad_id(), dtype=torch.long)
    labels = torch.full((len(examples), L), -100, dtype=torch.long)
    for i, (x, m) in enumerate(examples):
        t = torch.from_numpy(x.astype(np.int64))
        ids[i, : len(x)] = t
        lab = torch.where(torch.from_numpy(m.astype(bool)), t, torch.tensor(-100))
        labels[i, : len(x) - 1] = lab[1:]
    return ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)


# ---------------------------------------------------------------- model

def build_config(folder):
    import gen_m3_fixtures as g
    import transformers
    cfg = g.full_config_dict(ARCH)
    tok = _tokenizer()
    tc = cfg["text_config"]
    tc["vocab_size"] = VOCAB
    tc["bos_token_id"] = tok.token_to_id("]~!b[")
    tc["eos_token_id"] = tok.token_to_id("[e~[")
    tc["max_position_embeddings"] = 4096
    cfg["image_token_index"] = tok.token_to_id("]<]image[>[")
    cfg["video_token_index"] = tok.token_to_id("]<]video[>[")
    cfg["bos_token_id"] = tc["bos_token_id"]
    cfg["eos_token_id"] = tc["eos_token_id"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    config = transformers.AutoConfig.from_pretrained(folder)
    config._attn_implementation = "eager"
    try:
        config.text_config._attn_implementation = "eager"
    except Exception:
        pass
    return cfg, config


def init_weights(model, gen):
    n_layers = ARCH["num_hidden_layers"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            vision = "vision_tower" in name or "multi_modal_projector" in name
            if vision and p.dim() == 1:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)  # LayerNorm / biases
            elif "norm" in name:
                p.zero_()  # Gemma norm: the scale is 1 + w
            elif p.dim() >= 2:
                std = 0.02
                if re.search(r"(o_proj|down_proj)", name):
                    std = 0.02 / math.sqrt(2 * n_layers)
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                p.zero_()
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()


def router_modules(model):
    """(layer index, router module, bias buffer) for every MoE layer."""
    out = []
    for i, layer in enumerate(model.model.language_model.layers):
        mlp = layer.mlp
        if not hasattr(mlp, "gate") or not hasattr(mlp, "experts"):
            continue
        bias = getattr(mlp.gate, "e_score_correction_bias", None)
        if bias is None:
            bias = getattr(mlp, "e_score_correction_bias")
        out.append((i, mlp.gate, bias))
    return out


# ---------------------------------------------------------------- export

def export_upstream(model, cfg, folder, max_shard=1_900_000):
    import gen_m3_fixtures as g
    from safetensors.torch import save_file
    ups = g.to_upstream(model.state_dict(), cfg["text_config"])
    tensors = {}
    for name, t in ups.items():
        f32 = name.endswith("block_sparse_moe.gate.weight") or name.endswith("e_score_correction_bias")
        tensors[name] = t.to(torch.float32 if f32 else torch.bfloat16).contiguous()
    names = sorted(tensors, key=lambda n: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", n)])
    shards, cur, size = [], [], 0
    for n in names:
        b = tensors[n].numel() * tensors[n].element_size()
        if cur and size + b > max_shard:
            shards.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += b
    shards.append(cur)
    weight_map, total = {}, 0
    for k, group in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in group}, os.path.join(folder, fname), metadata={"format": "pt"})
        for n in group:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return len(shards), total


# ---------------------------------------------------------------- evaluation (as mxlm eval / lm-eval)

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize(s):
    for rx in [",", r"\$", r"(?s).*#### ", r"\.$"]:
        s = re.sub(rx, "", s)
    return s.lower()


def extract(text):
    m = STRICT.findall(text)
    strict = m[0].strip() if m else "[invalid]"
    f = FLEX.findall(text)
    flex = "[invalid]"
    if f:
        last = f[-1]
        flex = (last[0] or last[1]).strip()
    return strict, flex


def eval_prompts(n):
    with open(os.path.join(ROOT, "data", "arith", "test.jsonl"), encoding="utf-8") as f:
        test = [json.loads(line) for line in f][:n]
    with lzma.open(os.path.join(ROOT, "data", "arith", "train.jsonl.xz"), "rt", encoding="utf-8") as f:
        train = [json.loads(line) for line in f]
    rnd = random.Random(1234)
    render = gad.Renderer(os.path.join(MODEL_SRC, "chat_template.jinja"))
    out = []
    for doc in test:
        shots = rnd.sample(train, 5)
        msgs = []
        for s in shots:
            msgs.append({"role": "user", "content": "Question: " + s["question"] + "\nAnswer:"})
            msgs.append({"role": "assistant", "content": s["answer"]})
        msgs.append({"role": "user", "content": "Question: " + doc["question"] + "\nAnswer:"})
        out.append((doc, render(msgs, add_generation_prompt=True)))
    return out


@torch.no_grad()
def greedy_batch(model, prompts_ids, max_new, eos, device):
    """Batched greedy decoding without a KV cache: right-padded rows, each row's next token written at its own
    length (causal attention and the causal indexer make the padding invisible)."""
    B = len(prompts_ids)
    pad = pad_id()
    lens = torch.tensor([len(p) for p in prompts_ids], device=device)
    L = int(lens.max()) + max_new
    ids = torch.full((B, L), pad, dtype=torch.long, device=device)
    for i, p in enumerate(prompts_ids):
        ids[i, : len(p)] = torch.tensor(p, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = [[] for _ in range(B)]
    for _ in range(max_new):
        width = int(lens.max())
        logits = model(input_ids=ids[:, :width], use_cache=False).logits
        nxt = logits[torch.arange(B, device=device), lens - 1].float().argmax(-1)
        for i in range(B):
            if not done[i]:
                out[i].append(int(nxt[i]))
        ids[torch.arange(B, device=device), lens] = torch.where(done, torch.tensor(pad, device=device), nxt)
        done |= nxt == eos
        lens = torch.where(done, lens, lens + 1)
        if bool(done.all()):
            break
    return out


def accuracy_check(model, tok, n, device, max_new=128, batch=50):
    items = eval_prompts(n)
    eos = tok.token_to_id("[e~[")
    samples, strict_ok, flex_ok = [], 0, 0
    for b in range(0, len(items), batch):
        chunk = items[b:b + batch]
        ids = [tok.encode(p, add_special_tokens=False).ids for _, p in chunk]
        outs = greedy_batch(model, ids, max_new, eos, device)
        for (doc, _), o in zip(chunk, outs):
            if o and o[-1] == eos:
                o = o[:-1]
            text = tok.decode(o, skip_special_tokens=False)
            text = text.split("Question:")[0]
            gold = normalize(doc["answer"])
            s, f = extract(text)
            strict_ok += normalize(s) == gold
            flex_ok += normalize(f) == gold
            samples.append({"question": doc["question"], "gold": gold, "response": text, "strict": s, "flex": f})
    return strict_ok / len(items), flex_ok / len(items), samples


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="folder for default-model.tar.xz, logs and references")
    ap.add_argument("--seconds", type=float, default=210.0, help="wall-clock training budget")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--procs", type=int, default=14)
    args = ap.parse_args()
    import transformers
    import gen_m3_fixtures as g

    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    device = "cuda"
    torch.manual_seed(0)
    log("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())
    cache = "/tmp/mxlm_default_train_data.pkl"
    if os.path.exists(cache):
        with open(cache, "rb") as f:
            data = pickle.load(f)
        log("data from", cache)
    else:
        data = make_data(args.procs)
        with open(cache, "wb") as f:
            pickle.dump(data, f)
    work = os.path.join("/tmp", "mxlm_default_train")
    if os.path.isdir(work):
        import shutil
        shutil.rmtree(work)
    cfg, config = build_config(work)
    cls = g.model_class()
    model = cls(config).to(torch.float32)
    init_weights(model, torch.Generator().manual_seed(1))
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    n_text = sum(p.numel() for n, p in model.named_parameters() if "language_model" in n or n.startswith("lm_head"))
    log(f"params {n_params} (text {n_text}); layer_types {config.text_config.layer_types}")
    routers = router_modules(model)
    loads = {}

    def hook(idx):
        def f(_mod, _inp, out):
            top = out[-1] if isinstance(out, tuple) else out
            loads[idx] = torch.bincount(top.reshape(-1), minlength=ARCH["num_local_experts"]).float()
        return f

    for idx, gate, _ in routers:
        gate.register_forward_hook(hook(idx))

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    rng = random.Random(0)
    order = {k: list(range(len(v))) for k, v in data.items()}
    cursor = {k: len(v) for k, v in data.items()}
    kinds, weights = list(KIND_WEIGHT), list(KIND_WEIGHT.values())
    curve, step, tokens_seen, t0 = [], 0, 0, time.time()
    ema = None
    warmup = 60
    while True:
        elapsed = time.time() - t0
        frac = elapsed / args.seconds
        if frac >= 1.0:
            break
        kind = rng.choices(kinds, weights)[0]
        bs = KIND_BATCH[kind]
        if cursor[kind] + bs > len(order[kind]):
            rng.shuffle(order[kind])
            cursor[kind] = 0
        ex = [data[kind][j] for j in order[kind][cursor[kind]: cursor[kind] + bs]]
        cursor[kind] += bs
        ids, labels = batch_of(ex, device)
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for idx, _, bias in routers:
                if idx in loads:
                    ld = loads[idx]
                    bias.add_(1e-3 * torch.sign(ld.mean() - ld).to(bias.dtype))
        step += 1
        tokens_seen += int((labels != -100).sum())
        if step % 25 == 0 or step == 1:
            lv = float(loss.detach())
            ema = lv if ema is None else 0.8 * ema + 0.2 * lv
            curve.append({"step": step, "seconds": round(time.time() - t0, 1), "kind": kind, "loss": round(lv, 4),
                          "loss_ema": round(ema, 4), "lr": lr, "grad_norm": round(float(gn), 3)})
            log(f"step {step} {kind:7s} loss {lv:.4f} ema {ema:.4f} lr {lr:.2e} gn {float(gn):.2f} "
                f"target tokens {tokens_seen}")
    train_seconds = time.time() - t0
    log(f"trained {step} steps in {train_seconds:.0f}s, {tokens_seen} target tokens")
    for idx, _, bias in routers:
        log(f"layer {idx} router bias {[round(float(x), 4) for x in bias]} last load "
            f"{[int(x) for x in loads.get(idx, torch.zeros(1))]}")

    # ---- export in the upstream layout (BF16 + F32 router)
    model.eval()
    out_model = os.path.join(work, "default")
    os.makedirs(out_model, exist_ok=True)
    with open(os.path.join(out_model, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    n_shards, total = export_upstream(model.to("cpu"), cfg, out_model)
    log(f"exported {n_shards} shards, {total} bytes")
    tok = _tokenizer()
    for fn in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        with open(os.path.join(MODEL_SRC, fn), "rb") as src, open(os.path.join(out_model, fn), "wb") as dst:
            dst.write(src.read())
    with open(os.path.join(out_model, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tok.token_to_id("]~!b["), "eos_token_id": tok.token_to_id("[e~["),
                   "pad_token_id": tok.token_to_id("]!p~["), "do_sample": False}, f, indent=2)
        f.write("\n")

    # ---- layout proof + accuracy with transformers on the exported BF16 weights (f32 compute, as mxlm's CPU)
    reloaded, info = cls.from_pretrained(out_model, dtype=torch.float32, attn_implementation="eager",
                                         output_loading_info=True)
    reloaded.to(device).eval()
    log("loading info:", {k: v for k, v in info.items() if v})
    acc = {}
    t_eval = time.time()
    strict, flex, samples = accuracy_check(reloaded, tok, args.eval_n, device)
    acc = {"n": args.eval_n, "strict-match": strict, "flexible-extract": flex,
           "seconds": round(time.time() - t_eval, 1)}
    log("held-out accuracy (transformers, BF16 weights, f32 compute, greedy):", acc)
    with open(os.path.join(args.out, "samples.jsonl"), "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")

    # ---- reference logits for tests/py/test_default_model.py: the first eval prompt
    doc, prompt = eval_prompts(1)[0]
    ids = tok.encode(prompt, add_special_tokens=False).ids
    with torch.no_grad():
        lg = reloaded(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float().cpu().numpy()
    rows = sorted(set(list(range(0, len(ids), 16)) + list(range(len(ids) - 8, len(ids)))))
    np.save(os.path.join(args.out, "reference_logits.npy"), lg[rows].astype(np.float32))
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump({"tokens": ids, "rows": rows, "generator": "tools/train_default_model.py",
                   "transformers": transformers.__version__, "torch": torch.__version__,
                   "note": "logits of the exported BF16 checkpoint computed in float32 (eager attention)"}, f)

    summary = {"arch": ARCH, "vocab_size": VOCAB, "params": n_params, "text_params": n_text, "steps": step,
               "train_seconds": round(train_seconds, 1), "target_tokens": tokens_seen, "lr": args.lr,
               "batches": KIND_BATCH, "mix": KIND_WEIGHT, "conversations": {k: len(v) for k, v in data.items()},
               "final_loss_ema": ema, "curve": curve, "heldout_transformers": acc, "shards": n_shards,
               "bytes": total, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": transformers.__version__, "total_seconds": round(time.time() - t_start, 1)}
    with open(os.path.join(out_model, "training.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    with tarfile.open(os.path.join(args.out, "default-model.tar.xz"), "w:xz") as tf:
        tf.add(out_model, arcname="default")
    log("done in", round(time.time() - t_start, 1), "s")


if __name__ == "__main__":
    main()
