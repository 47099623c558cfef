"""`mxlm eval` against a scripted local server: every request body equals, byte for byte, what lm-eval's
local-chat-completions sends (few-shot draws computed live with CPython's random.Random(1234) over all
1319 test documents, json.dumps serialisation as aiohttp does), and accuracies are the exact fractions."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from eval_scripted_server import ScriptedServer, load_gsm8k  # noqa: E402

MXLM = os.environ.get("MXLM_BIN", "mxlm")
TEST, TRAIN = load_gsm8k()


def expected_body(doc_id, draws, model="scripted-model", max_tokens=16384, multiturn=True):
    msgs = []
    ids = draws[doc_id]
    if multiturn:
        for j in ids:
            msgs.append({"role": "user", "content": f"Question: {TRAIN[j]['question']}\nAnswer:"})
            msgs.append({"role": "assistant", "content": TRAIN[j]["answer"]})
        msgs.append({"role": "user", "content": f"Question: {TEST[doc_id]['question']}\nAnswer:"})
    else:
        content = "".join(f"Question: {TRAIN[j]['question']}\nAnswer: {TRAIN[j]['answer']}\n\n" for j in ids)
        msgs.append({"role": "user", "content": content + f"Question: {TEST[doc_id]['question']}\nAnswer:"})
    body = {
        "messages": msgs,
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stop": ["Question:", "</s>", "<|im_end|>"],
        "seed": 1234,
    }
    return json.dumps(body)  # aiohttp's default serializer


def python_draws(n, k=5, seed=1234):
    rnd = random.Random(seed)
    return [rnd.sample(range(len(TRAIN)), k) for _ in range(n)]


def run_eval(url, out, *extra, env=None, check=True):
    cmd = [MXLM, "eval", "--base-url", url, "--model", "scripted-model", "--tasks", "gsm8k", "--num-fewshot", "5",
           "--apply-chat-template", "--fewshot-as-multiturn", "--output-path", str(out), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def test_all_documents_byte_exact_bodies_and_gold_accuracy(tmp_path):
    draws = python_draws(len(TEST))
    # The spec's first rows, as a sanity check of the Python side itself.
    assert draws[0] == [6374, 3610, 957, 61, 742]
    assert draws[5] == [3797, 1216, 747, 1499, 5844]
    env = dict(os.environ, OPENAI_API_KEY="sk-test-key")
    with ScriptedServer(mode="gold") as server:
        p = run_eval(server.url, tmp_path, "--max-gen-toks", "16384", "--num-concurrent", "32", env=env)
        requests = list(server.requests)
    assert len(requests) == len(TEST)
    by_doc = {r["doc_id"]: r for r in requests}
    assert sorted(by_doc) == list(range(len(TEST)))
    for doc_id, r in by_doc.items():
        assert r["raw"] == expected_body(doc_id, draws), f"doc {doc_id}"
        assert r["path"] == "/v1/chat/completions"
        assert r["headers"]["Authorization"] == "Bearer sk-test-key"
        assert r["headers"]["Content-Type"] == "application/json"
    results = json.loads((tmp_path / "results.json").read_text())
    g = results["results"]["gsm8k"]
    assert g["exact_match,strict-match"] == 1.0
    assert g["exact_match,flexible-extract"] == 1.0
    assert g["exact_match_stderr,strict-match"] == 0.0
    assert results["n-samples"]["gsm8k"] == {"original": 1319, "effective": 1319}
    assert results["mxlm"]["documents"]["failed"] == 0
    assert results["mxlm"]["server_model"] == "scripted-model"
    samples = [json.loads(line) for line in (tmp_path / "samples_gsm8k.jsonl").read_text().splitlines()]
    assert [s["doc_id"] for s in samples] == list(range(len(TEST)))
    assert all(s["fewshot_ids"] == draws[s["doc_id"]] for s in samples)
    assert "|gsm8k|      3|flexible-extract|     5|exact_match|↑  |    1|±  |     0|" in p.stdout


def test_single_turn_layout_limit_and_base_url_forms(tmp_path):
    draws = python_draws(7)
    env = dict(os.environ, OPENAI_API_KEY="")
    with ScriptedServer(mode="gold") as server:
        # "--fewshot-as-multiturn false" puts the shots in one user message (lm-eval 0.4.13 syntax).
        base = server.url.removesuffix("/chat/completions")  # ".../v1"
        cmd = [MXLM, "eval", "--base-url", base, "--model", "m2", "--apply-chat-template", "--fewshot-as-multiturn",
               "false", "--limit", "7", "--num-concurrent", "3", "--output-path", str(tmp_path / "a")]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr
        single = list(server.requests)
        server.requests.clear()
        # --apply-chat-template alone turns multi-turn on, as lm-eval 0.4.13 does; a bare origin gets /v1/chat/completions.
        origin = server.url.removesuffix("/v1/chat/completions")
        cmd = [MXLM, "eval", "--base-url", origin, "--model", "m2", "--apply-chat-template", "--limit", "7",
               "--output-path", str(tmp_path / "b")]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr
        multi = list(server.requests)
    assert sorted(r["doc_id"] for r in single) == list(range(7))
    for r in single:
        assert r["raw"] == expected_body(r["doc_id"], draws, model="m2", max_tokens=256, multiturn=False)
        assert r["headers"]["Authorization"] == "Bearer "  # lm-eval sends the header with an empty key
    assert sorted(r["doc_id"] for r in multi) == list(range(7))
    for r in multi:
        assert r["path"] == "/v1/chat/completions"
        assert r["raw"] == expected_body(r["doc_id"], draws, model="m2", max_tokens=256, multiturn=True)


def test_mixed_answers_give_exact_fractions(tmp_path):
    from eval_scripted_server import mixed_reply
    import math
    import re

    n = 120
    with ScriptedServer(mode="mixed") as server:
        run_eval(server.url, tmp_path, "--limit", str(n))

    def norm(x):
        for r in [",", "\\$", "(?s).*#### ", "\\.$"]:
            x = re.sub(r, "", x)
        return x.lower()

    strict_scores, flex_scores = [], []
    for i in range(n):
        reply, gold = mixed_reply(i, TEST[i]["answer"]), TEST[i]["answer"]
        s = re.findall(r"#### (\-?[0-9\.\,]+)", reply)
        s = s[0].strip() if s else "[invalid]"
        f = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", reply)
        f = [m for m in f[-1] if m][0].strip() if f else "[invalid]"
        strict_scores.append(float(norm(s) == norm(gold)))
        flex_scores.append(float(norm(f) == norm(gold)))

    def stderr(a):
        mu = sum(a) / len(a)
        return math.sqrt(sum([(x - mu) ** 2 for x in a]) / (len(a) - 1)) / math.sqrt(len(a))

    g = json.loads((tmp_path / "results.json").read_text())["results"]["gsm8k"]
    # kinds 0,1,3 right for strict; 0,1,2 right for flexible (see mixed_reply): both 60/120.
    assert sum(strict_scores) == 60 and sum(flex_scores) == 60
    assert g["exact_match,strict-match"] == sum(strict_scores) / n
    assert g["exact_match,flexible-extract"] == sum(flex_scores) / n
    assert g["exact_match_stderr,strict-match"] == stderr(strict_scores)
    assert g["exact_match_stderr,flexible-extract"] == stderr(flex_scores)
