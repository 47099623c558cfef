"""Where does MXFP4 hurt the bundled default model? (issue 10: investigate instead of tuning the test)

1. Weight level: per quantized tensor, the relative error ||W - QDQ(W)|| / ||W|| of Quark's MXFP4 rule
   (shared/spec/mxfp4_numerics.md §4: scale 2^(floor(log2 amax) - 2), E2M1 round-half-even, saturate at 6),
   computed here with NumPy from the BF16 shards, grouped by layer and kind.
2. Output level: `mxlm quantize` variants that quantize only one group (experts, attention, dense MLPs, one
   layer, ...; everything else kept BF16 via --exclude-layers on top of the template's own list), scored with
   `mxlm logits` teacher-forced on the first N held-out 5-shot prompts + gold answers (the eval's prompts):
   the share of answer tokens whose argmax is the gold token, the share of answers whose every token is
   argmax-correct (= greedy decoding reproduces the gold answer, i.e. would be scored right), and the mean KL
   divergence from the BF16 model on the answer positions.

python3 tools/default_model_mxfp4_sensitivity.py --mxlm build/mxlm [--n 40] [--work /tmp/mxlm_sens]
"""

import argparse
import json
import lzma
import os
import random
import re
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import gen_arith_data as gad  # noqa: E402

MODEL = os.path.join(ROOT, "models", "default")
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def read_bf16_tensors(folder):
    out = {}
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))["weight_map"]
    for shard in sorted(set(index.values())):
        raw = open(os.path.join(folder, shard), "rb").read()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            buf = raw[8 + n + a: 8 + n + b]
            if info["dtype"] == "BF16":
                v = (np.frombuffer(buf, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif info["dtype"] == "F32":
                v = np.frombuffer(buf, dtype=np.float32)
            else:
                continue
            out[name] = v.reshape(info["shape"])
    return out


def qdq_mxfp4(w):
    """Quark 'even' MXFP4 quantize-dequantize along the last axis in blocks of 32."""
    shape = w.shape
    blocks = w.reshape(-1, 32).astype(np.float64)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        exp = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2, 0)
    scale = np.exp2(np.clip(exp, -127, 127))
    x = np.abs(blocks) / scale
    # round half to even onto the E2M1 grid, saturating at 6
    idx = np.searchsorted(E2M1, x)
    idx = np.clip(idx, 1, len(E2M1) - 1)
    lo, hi = E2M1[idx - 1], E2M1[idx]
    pick_hi = (x - lo > hi - x) | ((x - lo == hi - x) & ((idx % 2) == 0))
    q = np.where(pick_hi, hi, lo)
    q = np.where(x >= 6.0, 6.0, q)
    return (np.sign(blocks) * q * scale).reshape(shape)


def eval_items(n, tok):
    test = [json.loads(line) for line in open(os.path.join(ROOT, "data", "arith", "test.jsonl"), encoding="utf-8")][:n]
    with lzma.open(os.path.join(ROOT, "data", "arith", "train.jsonl.xz"), "rt", encoding="utf-8") as f:
        train = [json.loads(line) for line in f]
    rnd = random.Random(1234)
    render = gad.Renderer(os.path.join(MODEL, "chat_template.jinja"))
    items = []
    for doc in test:
        msgs = []
        for s in rnd.sample(train, 5):
            msgs += [{"role": "user", "content": "Question: " + s["question"] + "\nAnswer:"},
                     {"role": "assistant", "content": s["answer"]}]
        msgs.append({"role": "user", "content": "Question: " + doc["question"] + "\nAnswer:"})
        prompt = tok.encode(render(msgs, add_generation_prompt=True), add_special_tokens=False).ids
        full = tok.encode(render(msgs + [{"role": "assistant", "content": doc["answer"]}]),
                          add_special_tokens=False).ids
        assert full[: len(prompt)] == prompt
        end = full.index(tok.token_to_id("[e~["), len(prompt)) + 1
        items.append((full[:end], len(prompt)))
    return items


def logits(mxlm, model, tokens, out):
    subprocess.run([mxlm, "logits", "--model", model, "--tokens", ",".join(map(str, tokens)), "--output", out,
                    "--device", "cpu", "--dtype", "float32"], check=True, capture_output=True)
    return np.load(out)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mxlm", default=os.path.join(ROOT, "build", "mxlm"))
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--work", default="/tmp/mxlm_mxfp4_sensitivity")
    ap.add_argument("--report", default="")
    args = ap.parse_args()
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
    os.makedirs(args.work, exist_ok=True)

    # ---- the template's own quantization (to learn its exclude list and what it quantizes)
    full_dir = os.path.join(args.work, "all")
    subprocess.run([args.mxlm, "quantize", "--model", MODEL, "--output", full_dir, "--overwrite", "--no-progress"],
                   check=True, capture_output=True)
    qcfg = json.load(open(os.path.join(full_dir, "config.json")))["quantization_config"]
    base_exclude = qcfg["exclude"]
    qmap = json.load(open(os.path.join(full_dir, "model.safetensors.index.json")))["weight_map"]
    quantized = sorted(k[: -len(".weight_scale")] for k in qmap if k.endswith(".weight_scale"))

    # ---- 1. weight-level error
    w = read_bf16_tensors(MODEL)
    groups = {}
    for name in quantized:
        t = w[name + ".weight"].astype(np.float64)
        err = np.linalg.norm(t - qdq_mxfp4(t)) / np.linalg.norm(t)
        layer = re.search(r"layers\.(\d+)\.", name).group(1)
        kind = ("experts" if ".experts." in name else "shared_expert" if "shared_experts" in name
                else "attention" if "self_attn" in name else "dense_mlp")
        groups.setdefault((int(layer), kind), []).append(err)
    weight_rows = [{"layer": L, "kind": k, "tensors": len(v), "rel_err_mean": float(np.mean(v)),
                    "rel_err_max": float(np.max(v))} for (L, k), v in sorted(groups.items())]
    print("weight-level relative error ||W - QDQ(W)|| / ||W||:")
    for r in weight_rows:
        print(f"  layer {r['layer']} {r['kind']:13s} {r['tensors']:3d} tensors  mean {r['rel_err_mean']:.4f}  "
              f"max {r['rel_err_max']:.4f}")

    # ---- 2. output-level sensitivity
    n_layers = 5
    layer_glob = "language_model.model.layers.{}.*"
    variants = {
        "all (template)": [],
        "routed experts only": ["*self_attn*", "*.mlp.*", "*shared_experts*"],
        "shared experts only": ["*self_attn*", "*.mlp.*", "*.experts.*"],
        "attention only": ["*block_sparse_moe*", "*.mlp.*"],
        "dense MLP only": ["*self_attn*", "*block_sparse_moe*"],
        "all but attention": ["*self_attn*"],
    }
    for i in range(n_layers):
        variants[f"layer {i} only"] = [layer_glob.format(j) for j in range(n_layers) if j != i]
    items = eval_items(args.n, tok)
    base = []
    for k, (toks, p) in enumerate(items):
        base.append(logits(args.mxlm, MODEL, toks, os.path.join(args.work, "l.npy")))
    results = []

    def score(folder):
        tok_ok = tok_n = seq_ok = 0
        kls = []
        for (toks, p), lb in zip(items, base):
            lg = lb if folder is None else logits(args.mxlm, folder, toks, os.path.join(args.work, "l.npy"))
            pred = lg[p - 1: len(toks) - 1].argmax(-1)
            gold = np.array(toks[p:])
            tok_ok += int((pred == gold).sum())
            tok_n += len(gold)
            seq_ok += bool((pred == gold).all())
            lp, lq = log_softmax(lb[p - 1: len(toks) - 1].astype(np.float64)), log_softmax(
                lg[p - 1: len(toks) - 1].astype(np.float64))
            kls.append(float((np.exp(lp) * (lp - lq)).sum(-1).mean()))
        return tok_ok / tok_n, seq_ok / len(items), float(np.mean(kls))

    t, s, kl = score(None)
    results.append({"variant": "BF16", "token_acc": t, "answers_greedy_right": s, "kl": kl, "quantized": 0})
    print(f"\nteacher-forced on {len(items)} held-out 5-shot prompts:")
    print(f"  {'BF16':22s} token acc {t:.4f}  answers right {s:.3f}")
    for name, extra in variants.items():
        folder = os.path.join(args.work, re.sub(r"\W+", "_", name))
        cmd = [args.mxlm, "quantize", "--model", MODEL, "--output", folder, "--overwrite", "--no-progress"]
        if extra:
            cmd += ["--exclude-layers"] + base_exclude + extra
        subprocess.run(cmd, check=True, capture_output=True)
        nq = sum(1 for k in json.load(open(os.path.join(folder, "model.safetensors.index.json")))["weight_map"]
                 if k.endswith(".weight_scale"))
        t, s, kl = score(folder)
        results.append({"variant": name, "token_acc": t, "answers_greedy_right": s, "kl": kl, "quantized": nq})
        print(f"  {name:22s} token acc {t:.4f}  answers right {s:.3f}  KL {kl:.5f}  ({nq} tensors MXFP4)",
              flush=True)
    if args.report:
        json.dump({"n": len(items), "weights": weight_rows, "variants": results}, open(args.report, "w"), indent=1)


if __name__ == "__main__":
    main()
