"""Starting the batch API's fake-engine server (sglang_batchllm.batch_api.fake_server) in a
child process for the test_batch_api_* tests, and small helpers around it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, jobs_dir: str, *, delay: float = 0.0, api_key: str | None = None,
                 max_upload_mb: int | None = None, flush_seconds: float | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.jobs_dir, self.port = str(jobs_dir), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "sglang_batchllm.batch_api.fake_server", "--jobs-dir", self.jobs_dir,
               "--port", str(self.port), "--fake-delay", str(delay)]
        if api_key:
            cmd += ["--api-key", api_key]
        if max_upload_mb:
            cmd += ["--max-upload-mb", str(max_upload_mb)]
        if flush_seconds is not None:
            cmd += ["--flush-seconds", str(flush_seconds)]
        cmd += list(extra_args)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_BATCHLLM_")}
        self.log = open(os.path.join(self.jobs_dir + ".log"), "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._wait_up()

    def _wait_up(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the fake server exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the fake server did not come up:\n{self.log_text()}")

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.jobs_dir + ".log", "rb") as f:
            return f.read().decode(errors="replace")[-4000:]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=30)

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill does, no cleanup at all."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def batch_lines(n: int, *, prefix: str = "q", shared: str = "Summarize the following report in one line. ") -> bytes:
    """n OpenAI completion lines whose prompts share a prefix (the planner groups them)."""
    lines = [json.dumps({"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"prompt": shared + f"Report number {i} says item {i * 7} shipped.",
                                  "max_tokens": 8}})
             for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


def upload(client: httpx.Client, data: bytes, name: str = "requests.jsonl", purpose: str = "batch") -> httpx.Response:
    return client.post("/v1/files", files={"file": (name, data, "application/jsonl")}, data={"purpose": purpose})


def wait_status(client: httpx.Client, batch_id: str, statuses: tuple[str, ...], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/batches/{batch_id}").json()
        if body["status"] in statuses:
            return body
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} did not reach {statuses}: {body}")


def output_ids(client: httpx.Client, file_id: str | None) -> list[str]:
    if file_id is None:
        return []
    r = client.get(f"/v1/files/{file_id}/content")
    assert r.status_code == 200, r.text
    return [json.loads(line)["custom_id"] for line in r.text.splitlines()]
