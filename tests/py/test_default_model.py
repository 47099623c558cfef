"""The bundled default model (models/default, trained by tools/train_default_model.py) against transformers 5.17.

References (tests/fixtures/default_model/, written by the training run on the GPU machine): the token ids of the
first held-out 5-shot prompt, exactly as `mxlm eval --data-dir data/arith` builds it, and the transformers logits
of the exported BF16 checkpoint (float32 compute, eager attention) at every 16th position and the last 8, plus the
transformers greedy reply to that prompt. Checked here:
- Python Jinja2 (configured as transformers) + HF `tokenizers` reproduce the reference prompt ids from the data
  files, and `mxlm tokenize` gives the same ids (our tokenizer on our own tokenizer.json);
- `mxlm logits` (CPU, f32) matches the reference rows (sparse-attention selection is active: the prompt is ~25
  blocks of 32 tokens and layers 2-4 attend to 8 of them + the local block);
- `mxlm generate` greedy reproduces transformers' greedy reply token for token.
"""

import json
import lzma
import os
import random
import subprocess

import numpy as np
import pytest

MXLM = os.environ.get("MXLM_BIN", "build/mxlm")
SRC = os.environ.get("MXLM_SOURCE_DIR", ".")
MODEL = os.path.join(SRC, "models", "default")
FIX = os.path.join(SRC, "tests", "fixtures", "default_model")
DATA = os.path.join(SRC, "data", "arith")


def reference():
    with open(os.path.join(FIX, "reference.json")) as f:
        ref = json.load(f)
    return ref, np.load(os.path.join(FIX, "reference_logits.npy"))


def first_eval_prompt():
    """lm-eval's construction: Random(1234).sample(train, 5) for doc 0, multi-turn, generation prompt."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    with open(os.path.join(DATA, "test.jsonl"), encoding="utf-8") as f:
        doc = json.loads(f.readline())
    with lzma.open(os.path.join(DATA, "train.jsonl.xz"), "rt", encoding="utf-8") as f:
        train = [json.loads(line) for line in f]
    shots = random.Random(1234).sample(train, 5)
    msgs = []
    for s in shots:
        msgs += [{"role": "user", "content": "Question: " + s["question"] + "\nAnswer:"},
                 {"role": "assistant", "content": s["answer"]}]
    msgs.append({"role": "user", "content": "Question: " + doc["question"] + "\nAnswer:"})
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, **k: json.dumps(x, ensure_ascii=False)
    with open(os.path.join(MODEL, "chat_template.jinja"), encoding="utf-8") as f:
        template = env.from_string(f.read())
    return template.render(messages=msgs, tools=None, add_generation_prompt=True)


def test_prompt_tokens_match_hf_and_mxlm(tmp_path):
    from tokenizers import Tokenizer

    ref, _ = reference()
    prompt = first_eval_prompt()
    hf = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json")).encode(prompt, add_special_tokens=False).ids
    assert hf == ref["tokens"]
    src = tmp_path / "prompt.jsonl"
    src.write_text(json.dumps(prompt) + "\n", encoding="utf-8")
    res = subprocess.run([MXLM, "tokenize", "--model", MODEL, "--jsonl", str(src)], check=True, capture_output=True,
                         text=True)
    assert json.loads(res.stdout.strip().splitlines()[0]) == ref["tokens"]


def test_tokenizer_matches_hf_on_generated_conversations(tmp_path):
    """All three training formats (5-shot, <mm:think> chat, calculator tool calls) plus odd strings."""
    import sys

    from tokenizers import Tokenizer

    sys.path.insert(0, os.path.join(SRC, "tools"))
    import gen_arith_data as gad

    render = gad.Renderer(os.path.join(MODEL, "chat_template.jinja"))
    test = gad.test_problems()
    pool = gad.few_shot_pool({p.question for p in test})
    r = random.Random(3)
    stream = gad.train_stream(4, set())
    texts = [gad.training_text(k, r, stream, pool, render) for k in ["fewshot", "think", "tool"] * 20]
    texts += ["  12,345.678 $9  \n\n\t x", "naïve café 東京 🤖", "]~b]]~b][e~[<mm:think></mm:think>x]<]minimax[>[",
              "Question: A?\nAnswer: 3 * 4 = <<3*4=12>>12\n#### 12", ""]
    hf = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
    src = tmp_path / "texts.jsonl"
    src.write_text("".join(json.dumps(t) + "\n" for t in texts), encoding="utf-8")
    res = subprocess.run([MXLM, "tokenize", "--model", MODEL, "--jsonl", str(src)], check=True, capture_output=True,
                         text=True)
    got = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert got == [hf.encode(t, add_special_tokens=False).ids for t in texts]


def test_logits_match_transformers(tmp_path):
    ref, rows_ref = reference()
    out = tmp_path / "logits.npy"
    subprocess.run([MXLM, "logits", "--model", MODEL, "--tokens", ",".join(map(str, ref["tokens"])), "--output",
                    str(out), "--device", "cpu", "--dtype", "float32"], check=True)
    got = np.load(out)
    assert got.shape == (len(ref["tokens"]), 1152)
    got = got[ref["rows"]]
    scale = np.abs(rows_ref).max()
    err = np.abs(got - rows_ref).max()
    assert err <= 1e-4 * scale, f"max |diff| {err} (logit scale {scale})"
    assert (got.argmax(-1) == rows_ref.argmax(-1)).all()


def test_greedy_generation_matches_transformers():
    ref, _ = reference()
    want = ref["greedy_reply_tokens"]
    res = subprocess.run([MXLM, "generate", "--model", MODEL, "--tokens", ",".join(map(str, ref["tokens"])),
                          "--max-tokens", str(len(want)), "--temperature", "0"], check=True, capture_output=True,
                         text=True)
    got = [int(t) for t in res.stdout.strip().split(",")]
    assert got == want


if __name__ == "__main__":
    pytest.main([__file__, "-v"])
