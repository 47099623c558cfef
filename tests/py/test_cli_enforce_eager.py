"""--enforce-eager (decode steps never as CUDA graphs) on the CPU, where no backend captures steps: every subcommand
that loads a model accepts it and produces the same output as without it; bench decode prints only eager rows."""

import os
import subprocess

import numpy as np

MXLM = os.environ.get("MXLM_BIN", "build/mxlm")
SRC = os.environ.get("MXLM_SOURCE_DIR", ".")
MODEL = os.path.join(SRC, "tests", "fixtures", "m3", "dense")
PROMPT = "5,17,42,99,7"


def test_logits_are_the_same_with_enforce_eager(tmp_path):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    base = [MXLM, "logits", "--model", MODEL, "--tokens", PROMPT, "--output"]
    subprocess.run(base + [str(a)], check=True, timeout=60)
    subprocess.run(base + [str(b), "--enforce-eager"], check=True, timeout=60)
    assert np.array_equal(np.load(a), np.load(b))


def test_generate_is_the_same_with_enforce_eager():
    base = [MXLM, "generate", "--model", MODEL, "--tokens", PROMPT, "--max-tokens", "6", "--temperature", "0"]
    plain = subprocess.run(base, check=True, capture_output=True, text=True, timeout=60).stdout
    eager = subprocess.run(base + ["--enforce-eager"], check=True, capture_output=True, text=True, timeout=60).stdout
    assert plain == eager and plain.strip()


def test_bench_decode_on_cpu_runs_eager_only():
    res = subprocess.run([MXLM, "bench", "decode", "--model", MODEL, "--batch", "1,2", "--steps", "2", "--copy-mib", "8"],
                         check=True, capture_output=True, text=True, timeout=60)
    rows = [line.split() for line in res.stdout.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [r[:2] for r in rows] == [["1", "eager"], ["2", "eager"]], res.stdout
    assert "graph vs eager" not in res.stdout
    res = subprocess.run([MXLM, "bench", "decode", "--model", MODEL, "--batch", "1", "--steps", "2", "--copy-mib", "8",
                          "--enforce-eager"], check=True, capture_output=True, text=True, timeout=60)
    assert "eager" in res.stdout
