"""mxlm's tokenizer against Hugging Face `tokenizers` (the PyPI package, live) on the three real
tokenizers in tests/fixtures/tokenizers: encoding (with and without special tokens), decoding,
streaming detokenization and invalid UTF-8 input. Everything for one tokenizer goes through a
handful of `mxlm tokenize --jsonl` calls."""

import json
import lzma
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from tokenizers import Tokenizer

SOURCE = Path(os.environ.get("MXLM_SOURCE_DIR", Path(__file__).resolve().parents[2]))
BINARY = Path(os.environ.get("MXLM_BINARY_DIR", SOURCE / "build"))
MXLM = os.environ.get("MXLM_BIN", str(BINARY / "mxlm"))
FIXTURES = SOURCE / "tests" / "fixtures" / "tokenizers"
NAMES = ["gptoss", "qwen3", "deepseek_v3"]


def hand_corpus():
    lines = (SOURCE / "tests" / "fixtures" / "tokenizer_corpus.txt").read_bytes().split(b"\n")
    return [json.loads(line) for line in lines if line and not line.startswith(b"#")]


def gsm8k_corpus():
    path = SOURCE / "data" / "gsm8k" / "test.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        out += [row["question"], row["answer"]]
    return out


# Characters where tokenizers tend to disagree: Unicode spaces (U+180E is \s in PCRE2 but not in
# Oniguruma), contractions, combining marks, NFC/NFKC-sensitive letters, digits of other scripts,
# emoji sequences and special-token strings.
POOL = list(" \t\n\r\u00a0\u3000\u2028\u0085\u180e\u200b\u200d\ufeff\x0b\x0c\x1c") + list("aAzZ09'’\"!?.,;:-_/\\()[]{}<>|@#$%^&*+=~`") + \
    list("éÉñßİıΣσςĲǅ") + ["e\u0301", "\u0301", "\u0308", "\u0dca"] + list("中文日本語カタカナひらがな한국어") + \
    list("مرحبا שלום नमस्ते ภาษาไทย Привет Ελληνικά") + ["😀", "👍🏽", "👨‍👩‍👧", "🇺🇸", "❤️", "1️⃣"] + list("٠١٢३४५½²①Ⅳ") + \
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<｜User｜>", "<｜end▁of▁sentence｜>", "<|return|>", "'s", "'LL", "\r\n",
     "  ", "ﬁ", "㎏", "Ｈ"]


def corpus():
    hand = hand_corpus()
    rng = random.Random(1234)
    pooled = ["".join(rng.choice(POOL) for _ in range(rng.randint(1, 30))) for _ in range(1500)]
    # Pieces glued together meet across boundaries that no single line has (special tokens next to
    # spaces, digits next to CJK, emoji next to newlines, ...).
    glued = ["".join(rng.choice(hand) for _ in range(rng.randint(2, 6))) for _ in range(600)]
    spaced = [" " + s for s in hand] + [s + " " for s in hand] + ["\n" + s + "\n" for s in hand]
    return hand + spaced + glued + pooled + gsm8k_corpus()


@pytest.fixture(scope="module", params=NAMES)
def model(request):
    """A model directory in the build folder with the decompressed tokenizer.json."""
    name = request.param
    directory = BINARY / "tokenizers" / name
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "tokenizer.json"
    source = FIXTURES / name / "tokenizer.json.xz"
    if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
        target.write_bytes(lzma.decompress(source.read_bytes()))
    shutil.copyfile(FIXTURES / name / "tokenizer_config.json", directory / "tokenizer_config.json")
    return name, directory, Tokenizer.from_file(str(target))


def mxlm_lines(directory, inputs, *flags, tmp_path):
    path = tmp_path / "input.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for item in inputs:
            f.write(json.dumps(item, ensure_ascii=True) + "\n")
    result = subprocess.run([MXLM, "tokenize", "--model", str(directory), "--jsonl", str(path), *flags],
                            capture_output=True, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    # Split on "\n" only: decoded text may hold U+0085 or U+2028, which str.splitlines() also splits on.
    out = [json.loads(line) for line in result.stdout.decode("utf-8").split("\n")[:-1]]
    assert len(out) == len(inputs)
    return out


def first_mismatches(texts, expected, got, limit=5):
    bad = [(t, e, g) for t, e, g in zip(texts, expected, got) if e != g]
    return len(bad), [(repr(t)[:120], e[:40] if isinstance(e, list) else e, g[:40] if isinstance(g, list) else g)
                      for t, e, g in bad[:limit]]


def test_encode_matches_hf(model, tmp_path):
    name, directory, hf = model
    texts = corpus()
    assert len(texts) > 2500 or not gsm8k_corpus()
    expected = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    got = mxlm_lines(directory, texts, "--no-add-special-tokens", tmp_path=tmp_path)
    count, examples = first_mismatches(texts, expected, got)
    print(f"{name}: compared {len(texts)} lines")
    assert count == 0, f"{name}: {count} of {len(texts)} lines differ, e.g. {examples}"


def test_encode_with_special_tokens(model, tmp_path):
    name, directory, hf = model
    texts = hand_corpus()
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))

    def token(key):
        value = config.get(key)
        return value["content"] if isinstance(value, dict) else value

    bos = hf.token_to_id(token("bos_token")) if config.get("add_bos_token") else None
    expected = []
    for encoding in hf.encode_batch(texts, add_special_tokens=True):
        ids = encoding.ids
        # transformers prepends BOS for tokenizers configured with add_bos_token (DeepSeek-V3).
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        expected.append(ids)
    got = mxlm_lines(directory, texts, tmp_path=tmp_path)
    count, examples = first_mismatches(texts, expected, got)
    assert count == 0, f"{name}: {count} of {len(texts)} lines differ, e.g. {examples}"
    if name == "deepseek_v3":
        assert all(ids[0] == 0 for ids in got)


def decode_cases(hf):
    texts = hand_corpus()
    cases = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    rng = random.Random(99)
    vocab = hf.get_vocab_size(with_added_tokens=True)
    # Random ids: byte-level tokens that end inside characters, lone continuation bytes, specials.
    cases += [[rng.randrange(vocab) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    return [c for c in cases if c]


def test_decode_matches_hf(model, tmp_path):
    name, directory, hf = model
    cases = decode_cases(hf)
    for flags, skip in (((), False), (("--skip-special-tokens",), True)):
        expected = hf.decode_batch(cases, skip_special_tokens=skip)
        got = mxlm_lines(directory, cases, "--decode", *flags, tmp_path=tmp_path)
        count, examples = first_mismatches(cases, expected, got)
        assert count == 0, f"{name} skip={skip}: {count} of {len(cases)} decodes differ, e.g. {examples}"


def test_incremental_detokenization(model, tmp_path):
    name, directory, hf = model
    cases = decode_cases(hf)
    expected = hf.decode_batch(cases, skip_special_tokens=True)
    got = mxlm_lines(directory, cases, "--decode", "--incremental", "--skip-special-tokens", tmp_path=tmp_path)
    held_back = 0
    for ids, full, deltas in zip(cases, expected, got):
        assert len(deltas) == len(ids) + 1
        assert "".join(deltas) == full, (ids, full, deltas)
        # A delta never shows a replacement character that the full text does not have there.
        if "\ufffd" not in full:
            assert all("\ufffd" not in d for d in deltas), (ids, deltas)
        held_back += sum(1 for d in deltas[:-1] if d == "")
    assert held_back > 0  # multi-byte characters split across tokens were really exercised


def test_invalid_utf8_is_replaced_like_python(model, tmp_path):
    name, directory, hf = model
    samples = [b"abc\xff", b"\xe4\xb8", b"\xe4\xb8\xadx\xad", b"\xf0\x9f\x98", b"\xc0\xaf overlong", b"\xed\xa0\x80 surrogate",
               b"ok \xf4\x90\x80\x80 too big", b"\x80\x80\x80", b"\xe2\x82\xac\xe2\x82"]
    raw = b" | ".join(samples) + b"\xe4"  # one file, one process: loading a tokenizer is the slow part
    path = tmp_path / "raw.bin"
    path.write_bytes(raw)
    result = subprocess.run([MXLM, "tokenize", "--model", str(directory), "--file", str(path), "--no-add-special-tokens"],
                            capture_output=True, check=True)
    expected = hf.encode(raw.decode("utf-8", errors="replace"), add_special_tokens=False).ids
    assert json.loads(result.stdout) == expected


def test_bad_input_is_a_clear_error(tmp_path):
    directory = tmp_path / "broken"
    directory.mkdir()
    (directory / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}')
    result = subprocess.run([MXLM, "tokenize", "--model", str(directory), "--text", "a"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "merge" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([MXLM, "tokenize", "--model", str(tmp_path / "missing"), "--text", "a"], capture_output=True, text=True)
    assert result.returncode != 0 and "tokenizer.json" in result.stderr
