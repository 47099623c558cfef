"""strict-match, flexible-extract and exact_match of `mxlm eval` against Python's `re` (and numpy, as
lm-eval's exact_match uses it) on a table of tricky completions plus random strings over the characters
the patterns care about. The completions are served by a scripted server; mxlm's per-document results
come from its samples file."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from eval_scripted_server import ScriptedServer, load_gsm8k  # noqa: E402

MXLM = os.environ.get("MXLM_BIN", "mxlm")
TEST, _ = load_gsm8k()

TRICKY = [
    "#### 18", "The answer is $1,234.50.\n#### 1,234", "#### -5 and #### 7", "####  3", "#### -", "#### -.",
    "foo -12 bar", "no number here", "", "costs $5. Then 3.", "a-3-4", "$.", "1,000,000 and then ...",
    "x\n#### 42.\n", "-", "--7", "3.14.15", "#### 5\nAnswer: 6 apples", "#### $18", "#### 18.00", "#### 018",
    "So the answer is 18.", "$18", "18$", "-$18", "#### -3", "The answer: -3.", "#### 1,018\n#### 2", "###### 7",
    "#### 7\n", "7\n\n", "caf\u00e9 \u2019 #### 9", "\u0661\u0662 #### \u0663", "####\t5", "#### 5,", ",,", "5.5.",
    "Total: 2,125.", "#### 2,125", "#### 2125.", "#### .5", "A. 1 B. 2", "-0", "#### -0",
]


def py_filters(resp):
    s = re.findall(r"#### (\-?[0-9\.\,]+)", resp)
    s = s[0].strip() if s else "[invalid]"
    f = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", resp)
    if f:
        m = [x for x in f[-1] if x]
        f = m[0].strip() if m else "[invalid]"
    else:
        f = "[invalid]"
    return s, f


def py_exact_match(pred, ref):
    import numpy as np

    preds, refs = [pred], [ref]
    for r in [",", "\\$", "(?s).*#### ", "\\.$"]:
        preds = np.array([re.sub(r, "", x) for x in preds])
        refs = np.array([re.sub(r, "", x) for x in refs])
    preds, refs = np.char.lower(preds), np.char.lower(refs)
    return float(np.mean(preds == refs))


def build_table():
    rnd = random.Random(99)
    alphabet = ["#### ", "####", "#", " ", "-", "$", ".", ",", "\n", "1", "8", "0", "2", "a"]
    table = list(TRICKY)
    while len(table) < 400:
        table.append("".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 14))))
    # Completions that should be right: built around each document's own gold number.
    return table


def test_filters_and_metric_match_python_re(tmp_path):
    table = build_table()
    n = len(table)

    def reply(doc_id, gold):
        text = table[doc_id]
        # Splice the doc's gold number into some rows so exact matches happen often.
        gold_n = gold.split("#### ")[-1]
        return text.replace("18", gold_n) if doc_id % 2 else text

    with ScriptedServer(mode=reply) as server:
        cmd = [MXLM, "eval", "--base-url", server.url, "--model", "scripted-model", "--apply-chat-template",
               "--fewshot-as-multiturn", "--limit", str(n), "--output-path", str(tmp_path), "--no-progress"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    samples = [json.loads(line) for line in (tmp_path / "samples_gsm8k.jsonl").read_text().splitlines()]
    assert len(samples) == n
    strict_total = flex_total = 0.0
    for s in samples:
        i = s["doc_id"]
        resp = reply(i, TEST[i]["answer"])
        assert s["response"] == resp
        ps, pf = py_filters(resp)
        assert s["filtered"]["strict-match"] == ps, repr(resp)
        assert s["filtered"]["flexible-extract"] == pf, repr(resp)
        es, ef = py_exact_match(ps, TEST[i]["answer"]), py_exact_match(pf, TEST[i]["answer"])
        assert s["exact_match"]["strict-match"] == es, repr(resp)
        assert s["exact_match"]["flexible-extract"] == ef, repr(resp)
        strict_total += es
        flex_total += ef
    assert 0 < strict_total < n and 0 < flex_total < n  # the table exercises both outcomes
    g = json.loads((tmp_path / "results.json").read_text())["results"]["gsm8k"]
    assert g["exact_match,strict-match"] == strict_total / n
    assert g["exact_match,flexible-extract"] == flex_total / n
