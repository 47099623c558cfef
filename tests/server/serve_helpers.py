"""Starts `mxlm serve` on the serve-tiny model (tools/make_serve_fixture.py) on a free port of 127.0.0.1 for the
tests/py/test_server_*.py suites, waits for /health, and stops it at the end (checking it exits cleanly)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

SRC = os.environ.get("MXLM_SOURCE_DIR", os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
MXLM = os.environ.get("MXLM_BIN", os.path.join(SRC, "build", "mxlm"))
OUTPUTS = os.path.join(SRC, "tests", "fixtures", "m3_outputs")
sys.path.insert(0, os.path.join(SRC, "tools"))
import make_serve_fixture  # noqa: E402

MODEL_NAME = "serve-tiny"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(tmp_dir):
    return make_serve_fixture.make_model(os.path.join(str(tmp_dir), "serve-tiny"))


class Server:
    def __init__(self, model_dir, log_dir, extra=(), scripted=None, api_key=None, auto_tools=True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        flags = {"--port": str(self.port), "--block-size": "4", "--max-model-len": "4096", "--num-kv-pages": "4096",
                 "--served-model-name": MODEL_NAME, "--tool-call-parser": "minimax_m3",
                 "--reasoning-parser": "minimax_m3", "--max-num-seqs": "32", "--max-num-batched-tokens": "256"}
        extra = list(extra)
        for i in range(0, len(extra) - 1):
            if extra[i] in flags:  # the test's value wins
                flags[extra[i]] = extra[i + 1]
                extra[i:i + 2] = [None, None]
        extra = [e for e in extra if e is not None]
        args = [MXLM, "serve", model_dir] + [x for kv in flags.items() for x in kv]
        if auto_tools:
            args.append("--enable-auto-tool-choice")
        if scripted:
            args += ["--scripted-output", scripted]
        if api_key:
            args += ["--api-key", api_key]
        args += list(extra)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.log_path = os.path.join(str(log_dir), f"serve-{self.port}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mxlm serve exited with {self.proc.returncode}: {self.read_log()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                self.proc.kill()
                raise RuntimeError("mxlm serve did not become healthy: " + self.read_log())
            time.sleep(0.1)

    def read_log(self):
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def client(self, **kw):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "EMPTY", max_retries=0, **kw)

    def metrics(self):
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name.split("{")[0] if "_bucket" not in name else name] = float(value)
        return values, text

    def post(self, path, body, headers=None, raw=False):
        data = body if raw else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            payload = e.read()
            try:
                return e.code, json.loads(payload)
            except ValueError:
                return e.code, payload

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError("mxlm serve did not stop on SIGTERM")
            self.log.close()
            if code != 0:
                raise RuntimeError(f"mxlm serve exited with {code} after SIGTERM: {self.read_log()}")
