"""`mxlm eval` robustness against a scripted server: retries, failed requests, --fail-fast, null content,
time limits, Ctrl-C with a partial report, --resume, and --compare (against mxlm and lm-eval layouts)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from eval_scripted_server import ScriptedServer, load_gsm8k, mixed_reply  # noqa: E402

MXLM = os.environ.get("MXLM_BIN", "mxlm")
TEST, _ = load_gsm8k()


def cmd(url, out, *extra):
    return [MXLM, "eval", "--base-url", url, "--model", "scripted-model", "--apply-chat-template",
            "--fewshot-as-multiturn", "--output-path", str(out), "--no-progress", *extra]


def results(out):
    return json.loads((Path(out) / "results.json").read_text())


def samples(out):
    return [json.loads(line) for line in (Path(out) / "samples_gsm8k.jsonl").read_text().splitlines()]


def test_retries_then_failure_is_recorded_and_counted(tmp_path):
    # doc 2 fails twice then succeeds (3rd attempt); doc 4 always fails; doc 5 gets null content.
    with ScriptedServer(mode="gold", fail={2: 2, 4: -1}, null_content=[5]) as server:
        t0 = time.time()
        p = subprocess.run(cmd(server.url, tmp_path, "--limit", "8"), capture_output=True, text=True)
        elapsed = time.time() - t0
        attempts = dict(server.attempts)
    assert p.returncode == 3, p.stderr
    assert "1 request(s) failed" in p.stderr
    assert attempts[2] == 3 and attempts[4] == 3 and attempts[0] == 1
    assert elapsed >= 2.0  # tenacity's waits: 1 s after attempt 1, 1 s after attempt 2
    r = results(tmp_path)
    assert r["mxlm"]["documents"]["failed"] == 1
    assert r["mxlm"]["documents"]["retried"] == 2
    assert r["mxlm"]["documents"]["content_missing"] == 1
    assert r["results"]["gsm8k"]["exact_match,strict-match"] == 6 / 8  # failed and null docs are wrong
    s = {x["doc_id"]: x for x in samples(tmp_path)}
    assert s[4]["failed"] and "HTTP 500" in s[4]["error"] and s[4]["attempts"] == 3
    assert s[2]["attempts"] == 3 and not s[2]["failed"] and s[2]["exact_match"]["strict-match"] == 1.0
    assert s[5]["response"] == "" and s[5]["content_missing"]


def test_fail_fast_aborts(tmp_path):
    with ScriptedServer(mode="gold", fail={0: -1}) as server:
        p = subprocess.run(cmd(server.url, tmp_path, "--limit", "3", "--fail-fast", "--max-retries", "1",
                               "--num-concurrent", "1"), capture_output=True, text=True)
    assert p.returncode == 1
    assert "--fail-fast" in p.stderr and "doc 0" in p.stderr


def test_timeout_per_request(tmp_path):
    with ScriptedServer(mode="gold", delay=3.0) as server:
        p = subprocess.run(cmd(server.url, tmp_path, "--limit", "1", "--timeout", "1", "--max-retries", "1"),
                           capture_output=True, text=True)
    assert p.returncode == 3, p.stderr
    s = samples(tmp_path)[0]
    assert "within 1 s" in s["error"]
    assert s["latency_s"] < 2.5  # given up after the limit, not after the server's 3 s


def test_interrupt_writes_partial_report_and_resume_completes(tmp_path):
    n = 40
    with ScriptedServer(mode="mixed", delay=0.25) as server:
        proc = subprocess.Popen(cmd(server.url, tmp_path, "--limit", str(n), "--num-concurrent", "2"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Interrupt once a few documents are done (polling: start-up time varies, e.g. under sanitizers).
        samples_file = tmp_path / "samples_gsm8k.jsonl"
        deadline = time.time() + 60
        while time.time() < deadline:
            if samples_file.exists() and samples_file.read_text().count("\n") >= 4:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        partial = results(tmp_path)
        done = partial["mxlm"]["documents"]["finished"]
        assert partial["mxlm"]["partial"] and partial["mxlm"]["interrupted"]
        assert 0 < done < n
        assert len(samples(tmp_path)) == done
        first_requests = len(server.requests)

        server.delay = 0
        p = subprocess.run(cmd(server.url, tmp_path, "--limit", str(n), "--resume"), capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        resumed_requests = len(server.requests) - first_requests
    r = results(tmp_path)
    assert r["mxlm"]["documents"]["resumed"] == done
    assert resumed_requests == n - done
    assert not r["mxlm"]["partial"]
    assert [x["doc_id"] for x in samples(tmp_path)] == list(range(n))
    # Same numbers as one uninterrupted run.
    with ScriptedServer(mode="mixed") as server:
        subprocess.run(cmd(server.url, tmp_path / "full", "--limit", str(n)), check=True, capture_output=True)
    full = results(tmp_path / "full")["results"]["gsm8k"]
    for k in ("exact_match,strict-match", "exact_match,flexible-extract", "exact_match_stderr,strict-match"):
        assert r["results"]["gsm8k"][k] == full[k]


def test_resume_retries_failed_and_rejects_other_settings(tmp_path):
    with ScriptedServer(mode="gold", fail={1: -1}) as server:
        p = subprocess.run(cmd(server.url, tmp_path, "--limit", "4", "--max-retries", "1"), capture_output=True, text=True)
        assert p.returncode == 3
        server.fail = {}
        before = len(server.requests)
        p = subprocess.run(cmd(server.url, tmp_path, "--limit", "4", "--resume"), capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert [r["doc_id"] for r in server.requests[before:]] == [1]
        p = subprocess.run(cmd(server.url, tmp_path, "--limit", "4", "--resume", "--max-gen-toks", "99"),
                           capture_output=True, text=True)
        assert p.returncode == 1 and "different settings" in p.stderr
    assert results(tmp_path)["results"]["gsm8k"]["exact_match,strict-match"] == 1.0


def expected_recovery(base, cur):
    n = len(base)
    mb, mc = sum(base) / n, sum(cur) / n
    ratio = mc / mb
    resid = [c - ratio * b for b, c in zip(base, cur)]
    mu = sum(resid) / n
    se = math.sqrt(sum((x - mu) ** 2 for x in resid) / (n - 1)) / math.sqrt(n) / mb
    return ratio, ratio - 1.959963984540054 * se, ratio + 1.959963984540054 * se


def test_compare_paired_against_mxlm_and_lmeval_baselines(tmp_path):
    n = 60
    with ScriptedServer(mode="gold") as server:
        subprocess.run(cmd(server.url, tmp_path / "base", "--limit", str(n)), check=True, capture_output=True)
    with ScriptedServer(mode="mixed") as server:
        p = subprocess.run(cmd(server.url, tmp_path / "cur", "--limit", str(n), "--compare",
                               str(tmp_path / "base" / "results.json")), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "Recovery against" in p.stdout and "paired per document" in p.stdout
    comp = results(tmp_path / "cur")["mxlm"]["compare"]
    cur = {x["doc_id"]: x for x in samples(tmp_path / "cur")}
    for f in ("strict-match", "flexible-extract"):
        c = [cur[i]["exact_match"][f] for i in range(n)]
        ratio, lo, hi = expected_recovery([1.0] * n, c)
        got = comp["filters"][f]
        assert got["paired"] and got["n"] == n
        assert got["recovery"] == ratio == sum(c) / n
        assert math.isclose(got["recovery_ci95"][0], lo, abs_tol=1e-12)
        assert math.isclose(got["recovery_ci95"][1], hi, abs_tol=1e-12)
        assert got["lost"] == n - sum(c) and got["gained"] == 0

    # lm-eval's layout: results_<ts>.json with samples_gsm8k_<ts>.jsonl, one line per document and filter.
    lm = tmp_path / "lm"
    lm.mkdir()
    ts = "2026-01-01T00-00-00.000000"
    base_scores = {i: float(i % 4 != 0) for i in range(n)}
    (lm / f"results_{ts}.json").write_text(json.dumps({"results": {"gsm8k": {
        "exact_match,strict-match": sum(base_scores.values()) / n, "exact_match_stderr,strict-match": 0.05,
        "exact_match,flexible-extract": sum(base_scores.values()) / n, "exact_match_stderr,flexible-extract": 0.05}}}))
    with open(lm / f"samples_gsm8k_{ts}.jsonl", "w") as fh:
        for i in range(n):
            for f in ("strict-match", "flexible-extract"):
                fh.write(json.dumps({"doc_id": i, "filter": f, "exact_match": base_scores[i]}) + "\n")
    with ScriptedServer(mode="mixed") as server:
        p = subprocess.run(cmd(server.url, tmp_path / "cur2", "--limit", str(n), "--compare",
                               str(lm / f"results_{ts}.json")), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    comp = results(tmp_path / "cur2")["mxlm"]["compare"]
    c = [cur[i]["exact_match"]["strict-match"] for i in range(n)]
    b = [base_scores[i] for i in range(n)]
    ratio, lo, hi = expected_recovery(b, c)
    got = comp["filters"]["strict-match"]
    assert math.isclose(got["recovery"], ratio, rel_tol=1e-12)
    assert math.isclose(got["recovery_ci95"][0], lo, abs_tol=1e-12)
    assert got["lost"] == sum(1 for x, y in zip(b, c) if x == 1 and y == 0)
    assert got["gained"] == sum(1 for x, y in zip(b, c) if x == 0 and y == 1)


def test_bad_input_errors(tmp_path):
    p = subprocess.run([MXLM, "eval", "--base-url", "http://127.0.0.1:1/v1", "--model", "m"], capture_output=True,
                       text=True)
    assert p.returncode == 1 and "--apply-chat-template" in p.stderr
    p = subprocess.run([MXLM, "eval", "--base-url", "http://127.0.0.1:1/v1", "--model", "m", "--fewshot-as-multiturn"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "needs --apply-chat-template" in p.stderr
    p = subprocess.run([MXLM, "eval", "--base-url", "nonsense", "--model", "m", "--apply-chat-template"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "--base-url" in p.stderr
    p = subprocess.run([MXLM, "eval", "--base-url", "http://127.0.0.1:1/v1", "--model", "m", "--apply-chat-template",
                        "--data-dir", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 1 and "GSM8K test split not found" in p.stderr
    p = subprocess.run([MXLM, "eval", "--base-url", "http://127.0.0.1:1/v1", "--model", "m", "--apply-chat-template",
                        "--tasks", "mmlu"], capture_output=True, text=True)
    assert p.returncode == 1 and "only gsm8k" in p.stderr
