"""--tensor-parallel-size on the CLI (load_model.cpp, engine/tp_ranks.h) with CPU ranks, the same wiring as CUDA's
NCCL ranks: `mxlm logits` at TP 2 matches transformers' logits of the committed fixtures (and TP 1), `mxlm generate`
gives TP 1's tokens (greedy and seeded sampling), and `mxlm serve --tensor-parallel-size 2` answers completions
with TP 1's tokens. Unsplittable shapes are clear errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

SRC = os.environ.get("MXLM_SOURCE_DIR", ".")
MXLM = os.environ.get("MXLM_BIN", os.path.join(SRC, "build", "mxlm"))
FIXTURES = os.path.join(SRC, "tests", "fixtures", "m3")
sys.path.insert(0, os.path.join(SRC, "tests", "server"))
from serve_helpers import MODEL_NAME, Server, make_model  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(*args):
    p = subprocess.run([MXLM, *args], capture_output=True, text=True, env=ENV, timeout=300)
    return p.returncode, p.stdout, p.stderr


def fixture_tokens(name):
    with open(os.path.join(FIXTURES, name, "reference.json")) as f:
        return json.load(f)["tokens"][0]


@pytest.mark.parametrize("name", ["dense", "mixed", "moe16"])
def test_logits_tp2_match_reference(name, tmp_path):
    tokens = ",".join(map(str, fixture_tokens(name)))
    ref = np.load(os.path.join(FIXTURES, name, "logits_0.npy"))
    out = {}
    for tp in (1, 2):
        path = str(tmp_path / f"tp{tp}.npy")
        rc, _, err = run("logits", "--model", os.path.join(FIXTURES, name), "--tokens", tokens, "--output", path,
                         "--tensor-parallel-size", str(tp))
        assert rc == 0, err
        out[tp] = np.load(path)
        assert out[tp].shape == ref.shape
        assert np.abs(out[tp] - ref).max() / np.abs(ref).max() < 1e-4, tp
    assert np.abs(out[2] - out[1]).max() / np.abs(ref).max() < 1e-4


def test_unsplittable_shapes_are_errors(tmp_path):
    # mixed_mxfp4's shared expert has 32 intermediate rows: 16 columns per rank is not a whole MXFP4 scale block.
    tokens = ",".join(map(str, fixture_tokens("mixed_mxfp4")))
    rc, _, err = run("logits", "--model", os.path.join(FIXTURES, "mixed_mxfp4"), "--tokens", tokens, "--output",
                     str(tmp_path / "x.npy"), "--tensor-parallel-size", "2")
    assert rc != 0 and "cannot be split at column" in err, err
    rc, _, err = run("logits", "--model", os.path.join(FIXTURES, "mixed"), "--tokens", "1,2", "--output",
                     str(tmp_path / "y.npy"), "--tensor-parallel-size", "3")
    assert rc != 0 and "error:" in err, err
    rc, _, err = run("logits", "--model", os.path.join(FIXTURES, "mixed"), "--tokens", "1,2", "--output",
                     str(tmp_path / "z.npy"), "--tensor-parallel-size", "0")
    assert rc != 0 and "--tensor-parallel-size must be >= 1" in err, err


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.8", "--top-p", "0.9", "--seed", "7"]])
def test_generate_tp2_gives_tp1_tokens(sampling):
    outs = []
    for tp in (1, 2):
        rc, out, err = run("generate", "--model", os.path.join(FIXTURES, "moe16"), "--tokens", "1,2,3,4,5",
                           "--max-tokens", "16", "--ignore-eos", "--tensor-parallel-size", str(tp), *sampling)
        assert rc == 0, err
        outs.append(out.strip())
    assert len(outs[0].split(",")) == 16
    assert outs[1] == outs[0]


def test_serve_tp2_gives_tp1_tokens(tmp_path):
    model = make_model(tmp_path)
    texts = []
    for tp in (1, 2):
        server = Server(model, tmp_path, extra=["--tensor-parallel-size", str(tp)], auto_tools=False)
        try:
            client = server.client()
            r = client.completions.create(model=MODEL_NAME, prompt=["The answer is", "Ducks swim"], max_tokens=8,
                                          temperature=0)
            texts.append([c.text for c in sorted(r.choices, key=lambda c: c.index)])
        finally:
            server.stop()
    assert all(texts[0]) and texts[1] == texts[0]
