"""Sampling through the CLI against NumPy: `mxlm generate --max-tokens 1` over many seeds draws its first token from
the softmax of `mxlm logits`' last row with top-k / top-p applied as vLLM defines them (written here independently in
float64); and --kv-cache-dtype's errors on the CPU."""

import os
import subprocess

import numpy as np
import pytest

MXLM = os.environ.get("MXLM_BIN", "build/mxlm")
SRC = os.environ.get("MXLM_SOURCE_DIR", ".")
MODEL = os.path.join(SRC, "tests", "fixtures", "m3", "dense")
PROMPT = "5,17,42,99,7"


def filtered_probs(logits, temperature, top_k, top_p):
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(len(p), bool)
    keep[order[:top_k]] = True
    total = p[keep].sum()
    cum = np.cumsum(p[order[:top_k]]) / total
    last = int(np.searchsorted(cum, top_p))  # the first prefix whose mass reaches top_p
    keep[:] = False
    keep[order[:last + 1]] = True
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def test_generate_draws_follow_the_filtered_distribution(tmp_path):
    out = tmp_path / "logits.npy"
    subprocess.run([MXLM, "logits", "--model", MODEL, "--tokens", PROMPT, "--output", str(out)], check=True)
    want = filtered_probs(np.load(out)[-1], 1.5, 12, 0.8)
    n = 300
    counts = np.zeros(len(want))
    for seed in range(n):
        res = subprocess.run([MXLM, "generate", "--model", MODEL, "--tokens", PROMPT, "--max-tokens", "1",
                              "--temperature", "1.5", "--top-k", "12", "--top-p", "0.8", "--seed", str(seed),
                              "--ignore-eos"], check=True, capture_output=True, text=True)
        counts[int(res.stdout.strip())] += 1
    assert counts[want == 0].sum() == 0, "drew a token outside top-k / top-p"
    kept = want > 0
    assert kept.sum() >= 3  # a real choice, not a forced token
    # Chi-square over the kept tokens; 1e-4 quantile by Wilson-Hilferty.
    e = want[kept] * n
    chi = ((counts[kept] - e) ** 2 / e).sum()
    k = kept.sum() - 1
    limit = k * (1 - 2 / (9 * k) + 3.72 * np.sqrt(2 / (9 * k))) ** 3
    assert chi < limit, (chi, limit, counts[kept], e)


@pytest.mark.parametrize("cmd", [
    ["logits", "--model", MODEL, "--tokens", "1,2", "--output", "/dev/null"],
    ["generate", "--model", MODEL, "--tokens", "1,2", "--max-tokens", "1"],
    ["serve", "--port", "0"],  # the bundled default model
    ["bench", "decode", "--model", MODEL, "--batch", "1", "--steps", "1"],
])
@pytest.mark.parametrize("value,needle", [("bfloat16", "needs --device cuda"), ("float16", "auto, float32 or bfloat16")])
def test_kv_cache_dtype_errors_on_cpu(cmd, value, needle):
    res = subprocess.run([MXLM] + cmd + ["--kv-cache-dtype", value], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "--kv-cache-dtype" in res.stderr and needle in res.stderr, res.stderr


def test_kv_cache_dtype_float32_is_the_default(tmp_path):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    base = [MXLM, "logits", "--model", MODEL, "--tokens", PROMPT, "--output"]
    subprocess.run(base + [str(a)], check=True)
    subprocess.run(base + [str(b), "--kv-cache-dtype", "float32"], check=True)
    assert np.array_equal(np.load(a), np.load(b))
