"""Durability: a server killed mid-job (SIGKILL, no cleanup) or stopped (SIGTERM) resumes its
batches when it starts again, without redoing finished requests and without losing or
duplicating an output line."""

import glob
import json
import os
import subprocess
import sys
import time

from batch_api_support import Server, batch_lines, upload, wait_status

N = 600


def start_batch(client, n=N, prefix="r") -> str:
    file_id = upload(client, batch_lines(n, prefix=prefix)).json()["id"]
    r = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                         "completion_window": "24h"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def wait_some_done(client, batch_id, at_least=1, timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/batches/{batch_id}").json()
        if body["request_counts"]["completed"] >= at_least:
            return body
        time.sleep(0.05)
    raise AssertionError(f"no request of {batch_id} finished: {body}")


def only_output_file(jobs_dir) -> str:
    (path,) = glob.glob(os.path.join(jobs_dir, "batches", "*", "output.jsonl"))
    return path


def ids_of(text: str) -> list[str]:
    return [json.loads(line)["custom_id"] for line in text.splitlines()]


def test_killed_server_resumes_the_job_and_every_custom_id_appears_once(tmp_path):
    jobs = tmp_path / "jobs"
    server = Server(jobs, delay=0.01, flush_seconds=0.2)
    try:
        with server.client() as c:
            batch_id = start_batch(c)
            second = start_batch(c, n=20, prefix="second-")  # queued behind the first when the kill comes
            wait_some_done(c, batch_id, at_least=50)
            server.kill()
    finally:
        server.stop()
    out = only_output_file(jobs)
    before = open(out, "rb").read()
    assert 50 <= len(before.splitlines()) < N, "the kill must come mid-job"
    with open(out, "ab") as f:  # what a kill inside a write leaves: a torn last line
        f.write(b'{"id": "batch_req_torn", "custom_id": "r1')

    server = Server(jobs, delay=0.001)
    try:
        with server.client() as c:
            done = wait_status(c, batch_id, ("completed", "failed"))
            assert done["status"] == "completed", done
            assert done["request_counts"] == {"total": N, "completed": N, "failed": 0}
            text = c.get(f"/v1/files/{done['output_file_id']}/content").text
            ids = ids_of(text)
            assert sorted(ids) == sorted(f"r{i}" for i in range(N)) and len(ids) == N  # each once
            assert text.encode().startswith(before)  # lines written before the kill are kept as they were
            other = wait_status(c, second, ("completed",))
            assert sorted(ids_of(c.get(f"/v1/files/{other['output_file_id']}/content").text)) == \
                sorted(f"second-{i}" for i in range(20))
    finally:
        server.stop()
    assert "removed a partial last line" in server.log_text()


def test_stopped_server_leaves_the_batch_in_progress_and_finishes_it_on_start(tmp_path):
    jobs = tmp_path / "jobs"
    server = Server(jobs, delay=0.01, flush_seconds=0.2)
    try:
        with server.client() as c:
            batch_id = start_batch(c)
            wait_some_done(c, batch_id, at_least=20)
    finally:
        server.stop()  # SIGTERM: uvicorn's graceful stop runs the router's lifespan exit
    assert f"stopping with batch {batch_id} unfinished" in server.log_text()  # a graceful stop, not a kill
    written = open(only_output_file(jobs), "rb").read().splitlines()
    assert 20 <= len(written) < N
    server = Server(jobs, delay=0.001)
    try:
        with server.client() as c:
            mid = c.get(f"/v1/batches/{batch_id}").json()
            assert mid["status"] in ("in_progress", "finalizing", "completed")
            done = wait_status(c, batch_id, ("completed",))
            ids = ids_of(c.get(f"/v1/files/{done['output_file_id']}/content").text)
            assert len(ids) == len(set(ids)) == N
    finally:
        server.stop()


def test_a_second_server_on_the_same_jobs_dir_is_refused(tmp_path):
    jobs = tmp_path / "jobs"
    server = Server(jobs)
    try:
        other = subprocess.run([sys.executable, "-m", "sglang_batchllm.batch_api.fake_server", "--jobs-dir",
                                str(jobs), "--port", "1"], capture_output=True, text=True, timeout=120)
        assert other.returncode == 1
        assert f"is in use by another server (pid {server.proc.pid})" in other.stderr
        assert "--batchllm-jobs-dir" in other.stderr
    finally:
        server.stop()


def test_a_window_that_passed_while_the_server_was_down_expires_the_batch_instead_of_resuming(tmp_path):
    jobs = tmp_path / "jobs"
    server = Server(jobs, delay=0.01, flush_seconds=0.2)
    try:
        with server.client() as c:
            batch_id = start_batch(c)
            queued = start_batch(c, n=20, prefix="queued-")
            wait_some_done(c, batch_id, at_least=50)
            server.kill()
    finally:
        server.stop()
    before = open(only_output_file(jobs), "rb").read()
    assert 50 <= len(before.splitlines()) < N
    # started again "25 hours later": the clock runs a day and an hour ahead of the wall clock
    server = Server(jobs, delay=0.001, extra_args=("--clock-offset", str(25 * 3600)))
    try:
        with server.client() as c:
            done = c.get(f"/v1/batches/{batch_id}").json()  # expired at start, before anything resumed
            assert done["status"] == "expired", done
            assert done["expired_at"] >= done["expires_at"] and done["completed_at"] is None
            text = c.get(f"/v1/files/{done['output_file_id']}/content").text
            assert text.encode() == before  # what finished before the kill, no more: nothing resumed
            errors = [json.loads(x) for x in c.get(f"/v1/files/{done['error_file_id']}/content").text.splitlines()]
            assert {e["error"]["code"] for e in errors} == {"batch_expired"}
            assert sorted(ids_of(text) + [e["custom_id"] for e in errors]) == sorted(f"r{i}" for i in range(N))
            assert done["request_counts"] == {"total": N, "completed": len(ids_of(text)), "failed": len(errors)}
            other = c.get(f"/v1/batches/{queued}").json()
            assert other["status"] == "expired" and other["output_file_id"] is None
            assert other["request_counts"] == {"total": 20, "completed": 0, "failed": 20}
            time.sleep(0.5)
            assert c.get(f"/v1/files/{done['output_file_id']}/content").text == text  # still nothing ran
    finally:
        server.stop()
