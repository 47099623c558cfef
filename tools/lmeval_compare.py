#!/usr/bin/env python3
"""Runs the real lm-eval (PyPI `lm-eval==0.4.13`) and `mxlm eval` with the same options against the same
scripted local server, and compares what they send and what they report.

    python3 tools/lmeval_compare.py --mxlm build/mxlm [--limit 20] [--venv /tmp/mxlm-lmeval-venv]

lm-eval runs the seed's command
    lm_eval --model local-chat-completions --model_args model=...,base_url=.../v1/chat/completions,
            num_concurrent=32,max_gen_toks=16384 --tasks gsm8k --num_fewshot 5 --batch_size 1
            --apply_chat_template --fewshot_as_multiturn
plus --limit, --output_path/--log_samples (to read its per-document results) and --include_path with a copy
of its own gsm8k.yaml whose dataset points at the repository's GSM8K jsonl files (`dataset_path: json`),
so nothing is fetched from the Hugging Face hub. The single-turn variant (`--fewshot_as_multiturn false`;
lm-eval 0.4.13 turns multi-turn on by default with --apply_chat_template) is compared too. Exit status 0 only if every check matches. Needs network access to PyPI the first time
(the venv is reused afterwards); lm-eval 0.4.13's base install does not pull torch.
"""

from __future__ import annotations

import argparse
import glob
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "py"))
from eval_scripted_server import ScriptedServer  # noqa: E402

LM_EVAL_VERSION = "0.4.13"


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    lm_eval = venv / "bin" / "lm_eval"
    if lm_eval.exists():
        out = subprocess.run([python, "-c", "import lm_eval, importlib.metadata as m; print(m.version('lm_eval'))"],
                             capture_output=True, text=True)
        if out.stdout.strip() == LM_EVAL_VERSION:
            return lm_eval
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", f"lm-eval[api]=={LM_EVAL_VERSION}"], check=True)
    return lm_eval


def prepare_task(venv: Path, work: Path) -> Path:
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    src = ROOT / "data" / "gsm8k"
    for split in ("test", "train"):
        plain, xz = src / f"{split}.jsonl", src / f"{split}.jsonl.xz"
        (data / f"{split}.jsonl").write_bytes(plain.read_bytes() if plain.exists() else lzma.decompress(xz.read_bytes()))
    yaml_path = glob.glob(str(venv / "lib" / "python3*" / "site-packages" / "lm_eval" / "tasks" / "gsm8k" / "gsm8k.yaml"))
    if not yaml_path:
        raise SystemExit("lm-eval's gsm8k.yaml not found in the venv")
    text = Path(yaml_path[0]).read_text()
    data_files = (f"dataset_kwargs:\n  data_files:\n    train: {data / 'train.jsonl'}\n"
                  f"    test: {data / 'test.jsonl'}\n")
    text, n_path = re.subn(r"^dataset_path: .*$", "dataset_path: json", text, flags=re.M)
    text, n_name = re.subn(r"^dataset_name: .*\n", data_files, text, flags=re.M)
    if n_path != 1 or n_name != 1:
        raise SystemExit("unexpected gsm8k.yaml layout; cannot point it at local files")
    tasks = work / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "gsm8k.yaml").write_text(text)
    return tasks


def run_lm_eval(lm_eval: Path, tasks: Path, url: str, limit: int, out: Path, multiturn: bool) -> tuple[list, dict, list]:
    cmd = [str(lm_eval), "--model", "local-chat-completions", "--model_args",
           f"model=scripted-model,base_url={url},num_concurrent=32,max_gen_toks=16384",
           "--tasks", "gsm8k", "--num_fewshot", "5", "--batch_size", "1", "--apply_chat_template"]
    cmd += ["--fewshot_as_multiturn"] if multiturn else ["--fewshot_as_multiturn", "false"]
    cmd += ["--include_path", str(tasks), "--limit", str(limit), "--output_path", str(out), "--log_samples"]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OPENAI_API_KEY="sk-compare")
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"lm_eval failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}")
    results_file = sorted(out.rglob("results_*.json"))[-1]
    samples_file = sorted(out.rglob("samples_gsm8k_*.jsonl"))[-1]
    samples = [json.loads(line) for line in samples_file.read_text().split("\n") if line.strip()]  # not splitlines: U+2028 in text
    table = p.stdout[p.stdout.find("|Tasks"):]
    return cmd, {"results": json.loads(results_file.read_text()), "table": table, "seconds": seconds}, samples


def run_mxlm(mxlm: str, url: str, limit: int, out: Path, multiturn: bool) -> tuple[list, dict, list]:
    cmd = [mxlm, "eval", "--base-url", url, "--model", "scripted-model", "--num-concurrent", "32",
           "--max-gen-toks", "16384", "--tasks", "gsm8k", "--num-fewshot", "5", "--apply-chat-template"]
    cmd += ["--fewshot-as-multiturn"] if multiturn else ["--fewshot-as-multiturn", "false"]
    cmd += ["--limit", str(limit), "--output-path", str(out), "--no-progress"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OPENAI_API_KEY="sk-compare"))
    seconds = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"mxlm eval failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}")
    samples = [json.loads(line) for line in (out / "samples_gsm8k.jsonl").read_text().split("\n") if line.strip()]
    table = p.stdout[p.stdout.find("|Tasks"):]
    table = table[: table.find("\n", table.rfind("|\n") - 1) + 1] if table else ""
    return cmd, {"results": json.loads((out / "results.json").read_text()), "table": table, "seconds": seconds}, samples


def compare(label: str, lm: dict, mx: dict, lm_samples: list, mx_samples: list, lm_reqs: list, mx_reqs: list) -> dict:
    checks: dict[str, bool] = {}
    notes: list[str] = []
    lm_by_doc = {r["doc_id"]: r for r in lm_reqs}
    mx_by_doc = {r["doc_id"]: r for r in mx_reqs}
    checks["same documents requested"] = sorted(lm_by_doc) == sorted(mx_by_doc) and len(lm_reqs) == len(mx_reqs)
    raw_equal = json_equal = order_equal = headers_equal = True
    for doc, a in lm_by_doc.items():
        b = mx_by_doc.get(doc)
        if b is None:
            continue
        ja, jb = json.loads(a["raw"]), json.loads(b["raw"])
        if ja != jb:
            json_equal = False
            notes.append(f"doc {doc}: JSON differs")
        if list(ja) != list(jb):
            order_equal = False
        if a["raw"] != b["raw"]:
            raw_equal = False
        for h in ("Authorization", "Content-Type"):
            if a["headers"].get(h) != b["headers"].get(h):
                headers_equal = False
                notes.append(f"header {h}: lm-eval {a['headers'].get(h)!r} vs mxlm {b['headers'].get(h)!r}")
        if a["path"] != b["path"]:
            notes.append(f"path differs: {a['path']} vs {b['path']}")
            headers_equal = False
    checks["message lists and request fields equal (parsed JSON)"] = json_equal
    checks["request key order equal"] = order_equal
    checks["request bodies byte-identical"] = raw_equal
    checks["path, Authorization and Content-Type headers equal"] = headers_equal

    lr, mr = lm["results"]["results"]["gsm8k"], mx["results"]["results"]["gsm8k"]
    numbers = {}
    for key in ("exact_match,strict-match", "exact_match_stderr,strict-match", "exact_match,flexible-extract",
                "exact_match_stderr,flexible-extract"):
        numbers[key] = {"lm-eval": lr.get(key), "mxlm": mr.get(key)}
    checks["reported numbers identical (bit for bit)"] = all(v["lm-eval"] == v["mxlm"] for v in numbers.values())
    checks["n-samples equal"] = lm["results"]["n-samples"]["gsm8k"] == mx["results"]["n-samples"]["gsm8k"]
    checks["printed table identical"] = lm["table"].strip() == mx["table"].strip()
    if not checks["printed table identical"]:
        notes.append(f"lm-eval table:\n{lm['table']}\nmxlm table:\n{mx['table']}")

    per_doc_equal = True
    mx_s = {s["doc_id"]: s for s in mx_samples}
    for s in lm_samples:
        m = mx_s.get(s["doc_id"])
        f = s["filter"]
        if m is None or m["filtered"][f] != s["filtered_resps"][0] or m["exact_match"][f] != s["exact_match"]:
            per_doc_equal = False
            notes.append(f"doc {s['doc_id']} {f}: lm-eval {s['filtered_resps'][0]!r}/{s['exact_match']} vs "
                         f"mxlm {m and m['filtered'][f]!r}/{m and m['exact_match'][f]}")
        if m is not None and m["response"] != s["resps"][0][0]:
            per_doc_equal = False
            notes.append(f"doc {s['doc_id']}: responses differ")
    checks["per-document responses, extracted answers and scores equal"] = per_doc_equal
    return {"label": label, "checks": checks, "numbers": numbers, "notes": notes,
            "requests": {"lm-eval": len(lm_reqs), "mxlm": len(mx_reqs)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mxlm", default=str(ROOT / "build" / "mxlm"), help="the mxlm binary")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--venv", default="/tmp/mxlm-lmeval-venv", help="virtual environment for lm-eval")
    parser.add_argument("--report", help="write the comparison as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    venv = Path(args.venv)
    lm_eval = ensure_venv(venv)
    work = Path(tempfile.mkdtemp(prefix="mxlm-lmeval-"))
    try:
        tasks = prepare_task(venv, work)
        report = {"lm_eval_version": LM_EVAL_VERSION, "limit": args.limit, "runs": []}
        for multiturn in (True, False):
            label = "multi-turn (--fewshot_as_multiturn)" if multiturn else "single-turn (--fewshot_as_multiturn false)"
            with ScriptedServer(mode="mixed") as server:
                lm_cmd, lm, lm_samples = run_lm_eval(lm_eval, tasks, server.url, args.limit, work / f"lm-{multiturn}",
                                                     multiturn)
                lm_reqs = list(server.requests)
                server.requests.clear()
                mx_cmd, mx, mx_samples = run_mxlm(args.mxlm, server.url, args.limit, work / f"mx-{multiturn}", multiturn)
                mx_reqs = list(server.requests)
            result = compare(label, lm, mx, lm_samples, mx_samples, lm_reqs, mx_reqs)
            result["commands"] = {"lm-eval": " ".join(lm_cmd), "mxlm": " ".join(mx_cmd)}
            result["tables"] = {"lm-eval": lm["table"], "mxlm": mx["table"]}
            result["wall_seconds"] = {"lm-eval": round(lm["seconds"], 2), "mxlm": round(mx["seconds"], 2)}
            report["runs"].append(result)
        ok = all(all(r["checks"].values()) for r in report["runs"])
        for r in report["runs"]:
            print(f"== {r['label']}: {r['requests']['lm-eval']} lm-eval requests, {r['requests']['mxlm']} mxlm requests; "
                  f"wall time lm-eval {r['wall_seconds']['lm-eval']} s, mxlm {r['wall_seconds']['mxlm']} s")
            for name, passed in r["checks"].items():
                print(f"  [{'ok' if passed else 'DIFF'}] {name}")
            for key, v in r["numbers"].items():
                print(f"  {key}: lm-eval {v['lm-eval']!r}  mxlm {v['mxlm']!r}")
            for note in r["notes"][:20]:
                print(f"  note: {note}")
        print(report["runs"][0]["tables"]["lm-eval"])
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
        print("MATCH" if ok else "MISMATCH")
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
