"""A scripted OpenAI-compatible chat-completions server for testing `mxlm eval` (and lm-eval itself).

It records every request (path, headers, raw body) and answers from a script: the reply for a GSM8K test
document is a function of the document's index, which the server recovers from the last user message.
Used by tests/py/test_eval_*.py (in-process) and by tools/lmeval_compare.py (as a subprocess).
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def data_dir() -> Path:
    root = Path(os.environ.get("MXLM_SOURCE_DIR", Path(__file__).resolve().parents[2]))
    return root / "data" / "gsm8k"


def read_jsonl(path: Path) -> list[dict]:
    if path.exists():
        text = path.read_text(encoding="utf-8")
    else:
        text = lzma.decompress(Path(str(path) + ".xz").read_bytes()).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_gsm8k() -> tuple[list[dict], list[dict]]:
    d = data_dir()
    return read_jsonl(d / "test.jsonl"), read_jsonl(d / "train.jsonl")


def gold_number(answer: str) -> str:
    return answer.split("#### ")[-1].strip()


def mixed_reply(doc_id: int, gold_answer: str) -> str:
    """Replies that exercise both filters; which ones are right is fixed by the doc index."""
    n = gold_number(gold_answer)
    kind = doc_id % 6
    if kind == 0:
        return gold_answer  # both filters right
    if kind == 1:
        return f"The total is ${n}.\n#### {n}"  # both right (strict takes '#### n', flexible the last)
    if kind == 2:
        return f"I think it is {n}."  # strict invalid, flexible right
    if kind == 3:
        return f"#### {n}\nBut wait, maybe 12345 instead."  # strict right, flexible wrong
    if kind == 4:
        return "I do not know."  # both invalid
    return f"#### 1{n}"  # both wrong


class ScriptedServer:
    """mode: 'gold' (every answer right), 'mixed' (mixed_reply), or a callable(doc_id, gold) -> str.
    fail: {doc_id: number of attempts answered with HTTP 500 before a real answer} (-1: always)."""

    def __init__(self, mode="gold", fail=None, delay=0.0, model_name="scripted-model", null_content=()):
        self.test, self.train = load_gsm8k()
        self.by_text = {f"Question: {d['question']}\nAnswer:": i for i, d in enumerate(self.test)}
        self.mode = mode
        self.fail = dict(fail or {})
        self.delay = delay
        self.model_name = model_name
        self.null_content = set(null_content)
        self.requests: list[dict] = []
        self.attempts: dict[int, int] = {}
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def reply_for(self, doc_id: int) -> str:
        gold = self.test[doc_id]["answer"]
        if callable(self.mode):
            return self.mode(doc_id, gold)
        if self.mode == "gold":
            return gold
        if self.mode == "mixed":
            return mixed_reply(doc_id, gold)
        raise ValueError(self.mode)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, payload: dict):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                body = json.loads(raw)
                last = body["messages"][-1]["content"]
                # Single-turn requests carry the few-shot examples in the same message: the question is last.
                doc_id = server.by_text.get(last[last.rfind("Question: "):], -1)
                with server.lock:
                    server.requests.append(
                        {"path": self.path, "headers": dict(self.headers.items()), "raw": raw.decode(), "doc_id": doc_id}
                    )
                    attempt = server.attempts.get(doc_id, 0)
                    server.attempts[doc_id] = attempt + 1
                if server.delay:
                    time.sleep(server.delay)
                fails = server.fail.get(doc_id, 0)
                if doc_id < 0:
                    return self._send(400, {"error": {"message": "unknown question"}})
                if fails < 0 or attempt < fails:
                    return self._send(500, {"error": {"message": f"scripted failure {attempt + 1}"}})
                text = None if doc_id in server.null_content else server.reply_for(doc_id)
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{doc_id}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": server.model_name,
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        ],
                        "usage": {
                            "prompt_tokens": len(raw) // 4,
                            "completion_tokens": len(text or "") // 4,
                            "total_tokens": len(raw) // 4 + len(text or "") // 4,
                        },
                    },
                )

        return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", default="mixed", choices=["gold", "mixed"])
    parser.add_argument("--record", required=True, help="file to write recorded requests (jsonl) to on SIGTERM/stdin EOF")
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args()
    server = ScriptedServer(mode=args.mode).start()
    Path(args.port_file).write_text(str(server.port))
    try:
        # Runs until the parent closes our stdin.
        import sys

        sys.stdin.read()
    finally:
        server.stop()
        with open(args.record, "w", encoding="utf-8") as f:
            for r in server.requests:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
