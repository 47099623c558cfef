"""Trains the bundled default model's byte-level BPE tokenizer with Hugging Face `tokenizers`.

- Model: byte-level BPE (GPT-2 byte alphabet), 1280 entries from training + MiniMax-M3's added tokens.
- Pre-tokenizer: the o200k/MiniMax-M2 split regex (shared/spec/m3_chat_and_tools.md §1), except that digits are
  split one by one (`\\p{N}` instead of `\\p{N}{1,3}`): a small model learns column arithmetic far more easily
  on single digits. Then ByteLevel without its own regex, as in the real M3 tokenizer.
- Added tokens (appended after the BPE vocabulary, matched atomically before BPE): the role/turn markers and
  vision placeholders as special tokens; the reasoning and tool-call markers (`<mm:think>`, `</mm:think>`,
  `]<]minimax[>[`, `<tool_call>`, `</tool_call>`) as NON-special added tokens, so that decoding with
  skip_special_tokens still keeps the text the reasoning and tool-call parsers need.
- Corpus: conversations rendered from tools/gen_arith_data.py in all three formats (they contain the chat
  template's fixed system text, so it compresses well).

Writes tokenizer.json and tokenizer_config.json (bos `]~!b[`, eos `[e~[`, pad `]!p~[`, no BOS added automatically,
chat template = models/default/chat_template.jinja) into --out (default models/default).
"""

import argparse
import json
import os
import random
import sys

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers, AddedToken

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_arith_data as gad  # noqa: E402

SPLIT_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# MiniMax-M3's special tokens (m3_chat_and_tools.md §1), in the real model's id order.
SPECIAL = ["]!p~[", "]~b]", "[e~[", "]!d~[", "]<]image[>[", "]<]video[>[", "]<]start of image[>[",
           "]<]end of image[>[", "]<]vision pad[>[", "]~!b[", "<think>", "</think>"]
NON_SPECIAL = ["<mm:think>", "</mm:think>", "]<]minimax[>[", "<tool_call>", "</tool_call>"]
BPE_VOCAB = 1280


def corpus(n_each=1500):
    test = gad.test_problems()
    exclude = {p.question for p in test}
    pool = gad.few_shot_pool(exclude)
    render = gad.Renderer()
    r = random.Random(5)
    stream = gad.train_stream(12345, exclude)
    for kind, n in [("fewshot", n_each // 5), ("think", n_each), ("tool", n_each)]:
        for _ in range(n):
            yield gad.training_text(kind, r, stream, pool, render)
    for p in pool:
        yield p.question + "\n" + p.gsm8k_answer()


def build(out_dir):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Keep the markers out of the BPE merges: strip them from the corpus text before training.
    markers = SPECIAL + NON_SPECIAL

    def clean():
        for text in corpus():
            for m in markers:
                text = text.replace(m, "\n")
            yield text

    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(clean(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models", "default",
                           "chat_template.jinja"), encoding="utf-8") as f:
        template = f.read()
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "]~!b[",
        "eos_token": "[e~[",
        "pad_token": "]!p~[",
        "unk_token": "]!d~[",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": template,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return tok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(gad.ROOT, "models", "default"))
    args = ap.parse_args()
    tok = build(args.out)
    ids = {t: tok.token_to_id(t) for t in SPECIAL + NON_SPECIAL}
    print("vocab", tok.get_vocab_size(), "added", ids)
    sample = next(corpus(5))
    enc = tok.encode(sample, add_special_tokens=False)
    print(f"sample: {len(sample)} chars -> {len(enc.ids)} tokens")


if __name__ == "__main__":
    main()
