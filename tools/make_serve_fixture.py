#!/usr/bin/env python3
"""The `serve-tiny` test model of the server tests: a tiny MiniMax-M3 with a real tokenizer and chat template.

  make_serve_fixture.py tokenizer   # (re)trains tests/fixtures/serve-tiny/tokenizer.json (committed)
  make_serve_fixture.py model OUT   # assembles a model directory OUT at test time (no big committed files)

The tokenizer is a byte-level BPE with 512 entries (the vocabulary of the tiny M3 checkpoints), trained with HF
`tokenizers` on GSM8K questions/answers, the M3 chat template and the recorded M3 outputs. Its first ids are the
MiniMax-M3 special tokens (spec m3_chat_and_tools.md §1) as added tokens, ordered so that `]~!b[` = 1 and
`[e~[` = 2 match the checkpoint's bos/eos ids. The reasoning and tool-call markers are added but not special, so
decoding keeps them for the parsers. The pre-tokenizer is the GPT-4o split regex the spec names for M3.

The model directory links the weights and config.json of tests/fixtures/m3/mixed (dense + MoE layers, full and
sparse attention, vocab 512, sparse blocks of 4 tokens: serve it with --block-size 4), checked against transformers
by the model tests, and copies the tokenizer files and models/minimax-m3/chat_template.jinja.
"""
import json
import lzma
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "serve-tiny")
WEIGHTS = os.path.join(ROOT, "tests", "fixtures", "m3", "mixed")
TEMPLATE = os.path.join(ROOT, "models", "minimax-m3", "chat_template.jinja")

SPECIAL = ["]!p~[", "]~!b[", "[e~[", "]~b]", "]!d~[", "]<]image[>[", "]<]video[>[", "]<]start of image[>[",
           "]<]end of image[>[", "]<]vision pad[>["]
MARKERS = ["<mm:think>", "</mm:think>", "]<]minimax[>[", "<tool_call>", "</tool_call>"]
SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
         r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus():
    with open(os.path.join(ROOT, "data", "gsm8k", "test.jsonl"), encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            yield doc["question"] + "\n" + doc["answer"]
    with open(TEMPLATE, encoding="utf-8") as f:
        yield f.read()
    outputs = os.path.join(ROOT, "tests", "fixtures", "m3_outputs")
    for name in sorted(os.listdir(outputs)):
        with open(os.path.join(outputs, name), encoding="utf-8") as f:
            yield f.read()


def train_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL + MARKERS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:
        if added["content"] in MARKERS:
            added["special"] = False
    assert len(data["model"]["vocab"]) == 512, len(data["model"]["vocab"])
    os.makedirs(FIXTURE, exist_ok=True)
    with open(os.path.join(FIXTURE, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")
    with open(os.path.join(FIXTURE, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"add_bos_token": False, "add_eos_token": False, "bos_token": "]~!b[", "eos_token": "[e~[",
                   "pad_token": "]!p~[", "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast"},
                  f, indent=2)
        f.write("\n")


def make_model(out):
    os.makedirs(out, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        dst = os.path.join(out, name)
        if not os.path.exists(dst):
            os.symlink(os.path.join(WEIGHTS, name), dst)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(FIXTURE, name), os.path.join(out, name))
    shutil.copy(TEMPLATE, os.path.join(out, "chat_template.jinja"))
    return out


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "tokenizer":
        train_tokenizer()
    elif len(sys.argv) == 3 and sys.argv[1] == "model":
        make_model(sys.argv[2])
    else:
        sys.exit(__doc__)
