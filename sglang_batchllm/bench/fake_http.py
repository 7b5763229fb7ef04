"""A fake SGLang HTTP server: the frontend tests (tests/test_frontend_*.py) and
`scripts/bench_run_batch.py --fake-server` run against it on a CPU.

A real local HTTP server (`http.server` in a thread) with the subset of SGLang's API that
`RuntimeEndpoint` and the benchmark use: GET /health, GET /get_model_info, GET /server_info
(/get_server_info), GET /metrics, POST /flush_cache and POST /generate (single and batch bodies
as in `GenerateReqInput`). Outputs are deterministic functions of the prompt and sampling
parameters; every request body is recorded.

Fault injection: a prompt containing FAIL500 makes the whole request answer HTTP 500 (a batch that
holds it fails as a whole, as a bad item does on SGLang); a prompt containing SLOW makes the
request sleep `slow_s` seconds first.

`python -m sglang_batchllm.bench.fake_http --port N [--batchllm]` serves it in a process of its
own, as the benchmark starts a real server. With `batchllm=True` its /metrics also carry
`sglang:batchllm_*` counters, so the benchmark's stats path has something to read: they are
the fake's own counts (batch bodies, and the characters their items share with the batch's
first item), not a model of BatchLLM's scheduler.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _h(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _logprob(prefix_ids, tok) -> float:
    return -0.01 - int(_h(prefix_ids[-8:], tok)[:6], 16) % 500 / 100.0


def _tokens(item_input):
    return [ord(c) for c in item_input] if isinstance(item_input, str) else list(item_input)


_REGEX_CANDIDATES = ["42", "7", "-3", "3.5", "True", "False", '"abc"', "yes", "no", "2024-01-01"]


def fake_output(item_input, sp) -> str:
    """The fake model's completion: a hash of the prompt and the sampling parameters."""
    max_new = int(sp.get("max_new_tokens", 128))
    if max_new == 0:
        return ""
    key = _h(item_input if isinstance(item_input, str) else list(item_input), sp)
    regex = sp.get("regex")
    if regex is not None:
        ok = [c for c in _REGEX_CANDIDATES if re.fullmatch(regex, c)]
        return ok[int(key[:4], 16) % len(ok)] if ok else ""
    if sp.get("json_schema") is not None:
        return json.dumps({"k": key[:4]})
    words = [key[i : i + 4] for i in range(0, 24, 4)]
    text = " " + " ".join(words)
    if int(key[5], 16) % 2:
        text = text[:10] + "\n" + text[10:]  # gives stop strings something to stop at
    text = text[:max_new]
    stops = sp.get("stop") or []
    if isinstance(stops, str):
        stops = [stops]
    cut = min([text.find(s) for s in stops if s and s in text], default=-1)
    return text[:cut] if cut >= 0 else text


def _common_len(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the listen backlog: plain run_batch opens ~100 connections at once


class FakeServer:
    def __init__(self, latency_s: float = 0.0, slow_s: float = 30.0, *, host: str = "127.0.0.1", port: int = 0,
                 batchllm: bool = False, record: bool = True):
        self.latency_s = latency_s
        self.slow_s = slow_s
        self.batchllm = batchllm
        self.record = record  # a long-running benchmark server keeps no bodies
        self.lock = threading.Lock()
        self.requests: list = []  # (path, body)
        self.counters = {"batches": 0, "prefix_chars": 0}  # reported as sglang:batchllm_* when batchllm
        self.served = {"requests": 0, "items": 0}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _send_text(self, code, text):
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    self._send(200, {})
                elif self.path == "/metrics":
                    self._send_text(200, server.metrics_text())
                elif self.path == "/get_model_info":
                    self._send(200, {"model_path": "fake/model", "is_generation": True})
                elif self.path in ("/server_info", "/get_server_info"):
                    self._send(200, {"fake": True, "batchllm": server.batchllm})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                with server.lock:
                    if server.record:
                        server.requests.append((self.path, body))
                if self.path == "/flush_cache":
                    return self._send(200, {})
                if self.path != "/generate":
                    return self._send(404, {"error": {"message": "not found"}})
                code, obj = server.generate(body)
                self._send(code, obj)

        self.httpd = _Server((host, port), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def reset(self):
        with self.lock:
            self.requests.clear()

    # -- the fake model --------------------------------------------------------------------------

    def generate(self, body):
        kind = "text" if "text" in body else "input_ids"
        inp = body[kind]
        single = isinstance(inp, str) if kind == "text" else (not inp or not isinstance(inp[0], list))
        inputs = [inp] if single else inp
        sps = body.get("sampling_params") or {}
        sps = sps if isinstance(sps, list) else [sps] * len(inputs)

        def per_item(name, default):
            v = body.get(name)
            if v is None:
                return [default] * len(inputs)
            return v if isinstance(v, list) else [v] * len(inputs)

        rl, ls, _ = per_item("return_logprob", False), per_item("logprob_start_len", -1), per_item("top_logprobs_num", 0)
        text_in = bool(body.get("return_text_in_logprobs", False))
        texts = [x for x in inputs if isinstance(x, str)]
        if any("SLOW" in t for t in texts):
            time.sleep(self.slow_s)
        if any("FAIL500" in t for t in texts):
            return 500, {"error": {"message": "fake failure"}}
        if self.latency_s:
            time.sleep(self.latency_s)
        with self.lock:
            self.served["requests"] += 1
            self.served["items"] += len(inputs)
            if len(inputs) > 1:
                self.counters["batches"] += 1
                first = inputs[0]
                self.counters["prefix_chars"] += sum(_common_len(first, x) for x in inputs[1:])
        out = []
        for i, x in enumerate(inputs):
            toks = _tokens(x)
            text = fake_output(x, sps[i])
            meta = {
                "id": _h(x, sps[i])[:16],
                "prompt_tokens": len(toks),
                "completion_tokens": len(text),
                "finish_reason": {"type": "length"},
            }
            if rl[i]:
                start = max(ls[i], 0)
                meta["input_token_logprobs"] = [
                    [None if j == 0 else _logprob(toks[:j], toks[j]), toks[j], chr(toks[j]) if text_in else None]
                    for j in range(start, len(toks))
                ]
                out_ids = [ord(c) for c in text]
                meta["output_token_logprobs"] = [
                    [_logprob(toks + out_ids[:j], t), t, chr(t) if text_in else None] for j, t in enumerate(out_ids)
                ]
            out.append({"text": text, "meta_info": meta})
        return 200, out[0] if single else out

    def metrics_text(self) -> str:
        """Prometheus text as SGLang's /metrics (`--enable-metrics`) writes it: counters end in
        `_total`. BatchLLM's names only when serving as BatchLLM."""
        with self.lock:
            lines = [f'sglang:num_requests_total{{model_name="fake/model"}} {self.served["items"]}']
            if self.batchllm:
                lines += [
                    f'sglang:batchllm_prefix_tokens_planned_total{{model_name="fake/model"}} {self.counters["prefix_chars"]}',
                    f'sglang:batchllm_groups_done_total{{model_name="fake/model"}} {self.counters["batches"]}',
                    'sglang:batchllm_groups_live{model_name="fake/model"} 0',
                ]
        return "\n".join(lines) + "\n"

    # -- what was received -----------------------------------------------------------------------

    def generate_bodies(self):
        with self.lock:
            return [b for p, b in self.requests if p == "/generate"]

    @staticmethod
    def items(body) -> int:
        kind = "text" if "text" in body else "input_ids"
        inp = body[kind]
        single = isinstance(inp, str) if kind == "text" else (not inp or not isinstance(inp[0], list))
        return 1 if single else len(inp)

    def gen_requests(self):
        """/generate bodies that decode tokens (not prefills nor logprob scoring)."""

        def decodes(b):
            sps = b.get("sampling_params") or {}
            sps = sps if isinstance(sps, list) else [sps]
            return any(int(p.get("max_new_tokens", 128)) > 0 for p in sps)

        return [b for b in self.generate_bodies() if decodes(b)]




def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m sglang_batchllm.bench.fake_http", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--latency-ms", type=float, default=2.0, help="sleep per /generate request (default %(default)s)")
    p.add_argument("--batchllm", action="store_true", help="serve sglang:batchllm_* counters at /metrics")
    args = p.parse_args(argv)
    srv = FakeServer(args.latency_ms / 1000, host=args.host, port=args.port, batchllm=args.batchllm, record=False)
    print(f"fake SGLang server on {srv.url} (batchllm={args.batchllm})", flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
