"""`mxlm logits` / `mxlm generate` on the committed M3 fixtures, checked with NumPy against the transformers 5.17
reference logits (tests/fixtures/m3, tools/gen_m3_fixtures.py)."""

import json
import os
import subprocess

import numpy as np
import pytest

MXLM = os.environ.get("MXLM_BIN", "build/mxlm")
SRC = os.environ.get("MXLM_SOURCE_DIR", ".")
FIXTURES = os.path.join(SRC, "tests", "fixtures", "m3")


def reference(name):
    with open(os.path.join(FIXTURES, name, "reference.json")) as f:
        tokens = json.load(f)["tokens"][0]
    return tokens, np.load(os.path.join(FIXTURES, name, "logits_0.npy"))


@pytest.mark.parametrize("name", ["dense", "mixed", "moe16", "mixed_mxfp4"])
def test_logits_npy_matches_transformers(tmp_path, name):
    tokens, ref = reference(name)
    out = tmp_path / "logits.npy"
    subprocess.run([MXLM, "logits", "--model", os.path.join(FIXTURES, name), "--tokens", ",".join(map(str, tokens)),
                    "--output", str(out), "--device", "cpu", "--dtype", "float32"], check=True)
    got = np.load(out)  # NumPy itself parses the header: format v1.0, '<f4', C order
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_generate_greedy_starts_with_reference_argmax():
    tokens, ref = reference("moe16")
    res = subprocess.run([MXLM, "generate", "--model", os.path.join(FIXTURES, "moe16"), "--tokens",
                          ",".join(map(str, tokens)), "--max-tokens", "3", "--temperature", "0", "--ignore-eos"],
                         check=True, capture_output=True, text=True)
    ids = [int(t) for t in res.stdout.strip().split(",")]
    assert len(ids) == 3
    assert ids[0] == int(np.argmax(ref[-1]))


def test_generate_seeded_sampling_is_reproducible():
    tokens, _ = reference("dense")
    cmd = [MXLM, "generate", "--model", os.path.join(FIXTURES, "dense"), "--tokens", ",".join(map(str, tokens)),
           "--max-tokens", "8", "--temperature", "1.0", "--seed", "123", "--ignore-eos"]
    a = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    b = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    assert a == b and len(a.strip().split(",")) == 8


@pytest.mark.parametrize("args,needle", [
    (["--tokens", "1,x"], "not a token id"),
    (["--tokens", "1,600"], "outside the vocabulary"),
    (["--tokens", "1,2", "--device", "tpu"], "--device"),
    (["--tokens", "1,2", "--dtype", "int8"], "--dtype"),
])
def test_logits_bad_input_is_a_clear_error(tmp_path, args, needle):
    res = subprocess.run([MXLM, "logits", "--model", os.path.join(FIXTURES, "dense"), "--output",
                          str(tmp_path / "x.npy")] + args, capture_output=True, text=True)
    assert res.returncode != 0
    assert needle in res.stderr


def _model_with_tokenizer(tmp_path):
    """The `dense` fixture plus a byte-level BPE tokenizer (trained here with HF `tokenizers`, vocab < 512) and a
    small chat template, so `generate --prompt` can be checked against HF tokenization."""
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path / "model"
    shutil.copytree(os.path.join(FIXTURES, "dense"), d)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    return d, tok


@pytest.mark.parametrize("chat", [False, True])
def test_generate_prompt_tokenizes_like_hf_and_decodes_output(tmp_path, chat):
    d, tok = _model_with_tokenizer(tmp_path)
    prompt = "the quick brown fox"
    text = f"<s>user: {prompt}\n<s>assistant:" if chat else prompt
    ids = tok.encode(text).ids
    base = [MXLM, "generate", "--model", str(d), "--max-tokens", "6", "--temperature", "0", "--ignore-eos"]
    by_ids = subprocess.run(base + ["--tokens", ",".join(map(str, ids))], check=True, capture_output=True,
                            text=True).stdout.strip()
    generated = [int(t) for t in by_ids.split(",")]
    by_text = subprocess.run(base + ["--prompt", prompt] + (["--chat"] if chat else []), check=True,
                             capture_output=True, text=True).stdout
    assert by_text.rstrip("\n") == tok.decode(generated, skip_special_tokens=True)
