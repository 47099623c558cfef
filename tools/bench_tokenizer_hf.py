"""Hugging Face `tokenizers` throughput on the corpus bench/bench_tokenizer.cpp uses (gpt-oss
tokenizer; GSM8K test questions and answers, or the hand-written tokenizer corpus when
data/gsm8k/test.jsonl is absent). Single-threaded: one encode() per line, and encode_batch with
RAYON_NUM_THREADS=1 (set before tokenizers is imported).

    python tools/bench_tokenizer_hf.py [--repeats 5]
"""

import argparse
import json
import lzma
import os
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokenizers import Tokenizer  # noqa: E402  (after the thread settings)

ROOT = Path(__file__).resolve().parents[1]


def corpus():
    gsm8k = ROOT / "data" / "gsm8k" / "test.jsonl"
    if gsm8k.exists():
        rows = [json.loads(line) for line in gsm8k.read_text(encoding="utf-8").splitlines()]
        return [text for row in rows for text in (row["question"], row["answer"])]
    lines = (ROOT / "tests" / "fixtures" / "tokenizer_corpus.txt").read_bytes().split(b"\n")
    return [json.loads(line) for line in lines if line and not line.startswith(b"#")]


def best_of(repeats, fn):
    """Best CPU time of the process (all threads), like Google Benchmark's CPU column: on a shared
    machine wall time mostly measures the other jobs."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    data = lzma.decompress((ROOT / "tests/fixtures/tokenizers/gptoss/tokenizer.json.xz").read_bytes())
    tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    lines = corpus()
    megabytes = sum(len(line.encode("utf-8")) for line in lines) / 1e6
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(lines))  # also warms the cache
    per_line = best_of(args.repeats, lambda: [tokenizer.encode(line) for line in lines])
    batch = best_of(args.repeats, lambda: tokenizer.encode_batch(lines))
    one_text = "".join(line + "\n" for line in lines)
    whole = best_of(args.repeats, lambda: tokenizer.encode(one_text))
    print(f"corpus: {len(lines)} lines, {megabytes:.3f} MB, {tokens} tokens (tokenizers {__import__('tokenizers').__version__})")
    print(f"encode per line : {megabytes / per_line:7.2f} MB/s  ({tokens / per_line / 1e6:.2f} M tokens/s, CPU time)")
    print(f"encode_batch x1 : {megabytes / batch:7.2f} MB/s  (CPU time)")
    print(f"encode one text : {megabytes / whole:7.2f} MB/s  (CPU time)")


if __name__ == "__main__":
    main()
