"""The Files and Batches API over HTTP: the batch API's router on a real uvicorn server with the
fake engine (sglang_batchllm.batch_api.fake_server), driven by httpx and by the openai client."""

import json
import time

import httpx
import pytest

from batch_api_support import Server, batch_lines, output_ids, upload, wait_status

KEY = "sekret-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("http") / "jobs", delay=0.005, api_key=KEY, max_upload_mb=1)
    yield s
    s.stop()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def run_batch(client, data: bytes, endpoint="/v1/completions", **extra) -> dict:
    file = upload(client, data)
    assert file.status_code == 200, file.text
    r = client.post("/v1/batches", json={"input_file_id": file.json()["id"], "endpoint": endpoint,
                                         "completion_window": "24h", **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_openai_client_runs_a_batch_end_to_end(server, tmp_path):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    path = tmp_path / "requests.jsonl"
    path.write_bytes(batch_lines(40))
    file = client.files.create(file=path.open("rb"), purpose="batch")
    assert (file.object, file.purpose, file.bytes, file.filename) == ("file", "batch", path.stat().st_size,
                                                                      "requests.jsonl")
    assert client.files.retrieve(file.id).id == file.id
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h",
                                  metadata={"owner": "tests"})
    assert batch.status == "validating" and batch.metadata == {"owner": "tests"}
    deadline = time.monotonic() + 60
    while batch.status not in ("completed", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == batch.request_counts.completed == 40 and batch.request_counts.failed == 0
    assert batch.error_file_id is None and batch.output_file_id is not None
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.expires_at == batch.created_at + 24 * 3600
    assert batch.usage.input_tokens > 0 and batch.usage.output_tokens == 40 * 4
    assert batch.usage.input_tokens_details.cached_tokens > 0  # the shared prefix, as the fake engine counts it
    lines = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(f"q{i}" for i in range(40))
    assert all(x["response"]["status_code"] == 200 and x["response"]["body"]["object"] == "text_completion"
               for x in lines)
    out = client.files.retrieve(batch.output_file_id)
    assert out.purpose == "batch_output" and out.bytes == len(client.files.content(out.id).content)
    listed = client.batches.list(limit=100)
    assert batch.id in [b.id for b in listed.data]


def test_chat_batch_and_failed_requests_go_to_the_error_file(client):
    lines = [{"custom_id": f"c{i}" if i != 2 else "c2-fake-fail", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": f"hello number {i}"}], "max_tokens": 3}}
             for i in range(5)]
    batch = run_batch(client, "\n".join(map(json.dumps, lines)).encode(), endpoint="/v1/chat/completions")
    done = wait_status(client, batch["id"], ("completed", "failed"))
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
    assert sorted(output_ids(client, done["output_file_id"])) == ["c0", "c1", "c3", "c4"]
    errors = client.get(f"/v1/files/{done['error_file_id']}/content").text.splitlines()
    assert [json.loads(e)["custom_id"] for e in errors] == ["c2-fake-fail"]
    assert json.loads(errors[0])["error"]["code"] == "engine_error"
    body = json.loads(client.get(f"/v1/files/{done['output_file_id']}/content").text.splitlines()[0])
    assert body["response"]["body"]["object"] == "chat.completion"


def test_lines_not_of_the_batch_endpoint_fail_validation(client):
    batch = run_batch(client, batch_lines(3), endpoint="/v1/chat/completions")
    done = wait_status(client, batch["id"], ("failed", "completed"))
    assert done["status"] == "failed" and done["failed_at"] is not None
    errors = done["errors"]["data"]
    assert [e["line"] for e in errors] == [1, 2, 3]
    assert errors[0]["message"].startswith("requests.jsonl:1: url is /v1/completions but the batch's endpoint is "
                                           "/v1/chat/completions")
    assert done["output_file_id"] is None and done["in_progress_at"] is None


def test_malformed_upload_is_refused_with_the_readers_file_line_reason(client):
    good = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}})
    for bad, reason in [
        (good + "\n{not json\n", "requests.jsonl:2: not valid JSON"),
        (good + "\n" + good + "\n", "requests.jsonl:2: duplicate custom_id 'a' (first on line 1)"),
        ('{"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}\n',
         "requests.jsonl:1: "),
        ("\n\n", "requests.jsonl: the file has no requests"),
    ]:
        r = upload(client, bad.encode())
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["message"].startswith(reason), error
        assert "the file was not stored" in error["message"] and error["code"] == "invalid_batch_file"
        assert error["type"] == "invalid_request_error" and error["param"] == "file"
    assert upload(client, (good + "\n{not json\n").encode()).json()["error"]["line"] == 2


def test_upload_checks(client, server):
    r = upload(client, batch_lines(2), purpose="fine-tune")
    assert r.status_code == 400 and "purpose must be 'batch'" in r.json()["error"]["message"]
    r = client.post("/v1/files", data={"purpose": "batch"}, files={"other": ("x", b"y")})
    assert r.status_code == 400 and "no 'file' part" in r.json()["error"]["message"]
    r = client.post("/v1/files", json={"purpose": "batch"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    big = batch_lines(1) * (1 + (1 << 20) // len(batch_lines(1)))  # just over the server's 1 MiB
    r = upload(client, big)
    assert r.status_code == 413 and "--batchllm-max-upload-mb" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced as the body streams
        yield b"--B\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--B\r\n"
        yield b"Content-Disposition: form-data; name=\"file\"; filename=\"f.jsonl\"\r\n\r\n"
        for _ in range(20):
            yield b"x" * (128 * 1024)
        yield b"\r\n--B--\r\n"

    r = client.post("/v1/files", content=chunks(), headers={"content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 413
    import os

    files = os.listdir(os.path.join(server.jobs_dir, "files"))
    assert not any(f.endswith(".part") for f in files)  # refused uploads leave nothing behind


def test_every_route_needs_the_api_key(server):
    anon = httpx.Client(base_url=server.url, timeout=10)
    wrong = httpx.Client(base_url=server.url, timeout=10, headers={"Authorization": "Bearer nope"})
    routes = [("POST", "/v1/files"), ("GET", "/v1/files"), ("GET", "/v1/files/file-000000000000000000000000"),
              ("GET", "/v1/files/file-000000000000000000000000/content"),
              ("DELETE", "/v1/files/file-000000000000000000000000"), ("POST", "/v1/batches"),
              ("GET", "/v1/batches"), ("GET", "/v1/batches/batch_000000000000000000000000"),
              ("POST", "/v1/batches/batch_000000000000000000000000/cancel")]
    for c in (anon, wrong):
        for method, path in routes:
            assert c.request(method, path).status_code == 401, (method, path)
    with server.client() as ok:
        assert ok.get("/v1/batches").status_code == 200
        assert ok.get("/v1/files/file-000000000000000000000000").status_code == 404


def test_ids_are_never_paths(client, server):
    import os

    secret = os.path.join(server.jobs_dir, "jobs.sqlite3")
    assert os.path.exists(secret)
    for path in ["/v1/files/..%2Fjobs.sqlite3/content", "/v1/files/../jobs.sqlite3/content",
                 "/v1/files/%2e%2e%2f%2e%2e%2fetc%2fpasswd/content", "/v1/files/file-..%2F..%2Fjobs.sqlite3",
                 "/v1/files/..%2f..%2fjobs.sqlite3", "/jobs.sqlite3", "/files", "/v1/files/lock/content",
                 "/v1/batches/..%2Fjobs.sqlite3", "/v1/files/" + "a" * 5000]:
        r = client.get(path)
        assert r.status_code in (404, 405), (path, r.status_code)
        assert b"SQLite" not in r.content
    stored = os.listdir(os.path.join(server.jobs_dir, "files"))[0]
    assert client.get(f"/v1/files/{stored}/content").status_code == 404  # a storage name is not an id
    assert client.get(f"/v1/files/{stored.split('.')[0]}/content").status_code == 404


def test_file_delete(client):
    file_id = upload(client, batch_lines(2)).json()["id"]
    r = client.delete(f"/v1/files/{file_id}")
    assert r.status_code == 200 and r.json() == {"id": file_id, "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{file_id}").status_code == 404
    assert client.get(f"/v1/files/{file_id}/content").status_code == 404
    r = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                         "completion_window": "24h"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"


def test_batch_create_checks(client):
    file_id = upload(client, batch_lines(2)).json()["id"]
    base = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}
    for change, param in [({"endpoint": "/v1/embeddings"}, "endpoint"), ({"completion_window": "1h"},
                          "completion_window"), ({"input_file_id": None}, "input_file_id"),
                          ({"metadata": {"k": "v" * 513}}, "metadata"), ({"metadata": {str(i): "v" for i in range(17)}},
                          "metadata")]:
        r = client.post("/v1/batches", json={**base, **change})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert client.post("/v1/batches", content=b"{oops").status_code == 400


def test_pagination_newest_first(client):
    ids = [run_batch(client, batch_lines(1, prefix=f"p{i}-"))["id"] for i in range(5)]
    seen, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = client.get("/v1/batches", params=params).json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        seen += [b["id"] for b in page["data"]]
        if not page["has_more"]:
            break
        assert page["last_id"] == page["data"][-1]["id"] and page["first_id"] == page["data"][0]["id"]
        after = page["last_id"]
    assert seen[:5] == ids[::-1]  # newest first; the module's earlier batches follow
    assert len(seen) == len(set(seen))
    for bad in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"after": "batch_nope"}):
        assert client.get("/v1/batches", params=bad).status_code == 400, bad


def test_cancel_keeps_what_finished_and_ordinary_traffic_is_served(client):
    batch = run_batch(client, batch_lines(1500, prefix="cancel-"))  # 1,500 x 5 ms: ~7 s of fake engine
    running = wait_status(client, batch["id"], ("in_progress",))
    assert running["request_counts"]["total"] == 1500
    deadline = time.monotonic() + 30
    while client.get(f"/v1/batches/{batch['id']}").json()["request_counts"]["completed"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # The job's requests run on the server's event loop: other requests must not wait for them.
    # (Measured once the job runs: while its file is read and planned in the reader thread, a
    # request waits for the GIL at each of its I/O steps, up to ~0.6 s on a 2-core CPU for
    # 1,500 lines; docs/batch-api.md.)
    latencies = []
    for _ in range(10):
        t = time.monotonic()
        assert client.post("/generate", json={"text": "hi"}).status_code == 200
        assert client.get(f"/v1/batches/{batch['id']}").status_code == 200
        latencies.append(time.monotonic() - t)
        time.sleep(0.05)
    assert max(latencies) < 0.5, latencies
    assert client.get(f"/v1/batches/{batch['id']}").json()["request_counts"]["completed"] < 1500, \
        "still running while measured"
    r = client.post(f"/v1/batches/{batch['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
    assert r.json()["cancelling_at"] is not None
    done = wait_status(client, batch["id"], ("cancelled",))
    kept = output_ids(client, done["output_file_id"])
    assert 0 < len(kept) < 1500 and len(kept) == len(set(kept)) == done["request_counts"]["completed"]
    assert done["cancelled_at"] is not None and done["completed_at"] is None
    time.sleep(1.5)  # nothing more is admitted after the cancel
    assert output_ids(client, done["output_file_id"]) == kept
    again = client.post(f"/v1/batches/{batch['id']}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]["message"]


def test_input_of_an_active_batch_cannot_be_deleted(client):
    file_id = upload(client, batch_lines(800, prefix="busy-")).json()["id"]
    batch = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                             "completion_window": "24h"}).json()
    r = client.delete(f"/v1/files/{file_id}")
    assert r.status_code == 409 and batch["id"] in r.json()["error"]["message"]
    assert client.post(f"/v1/batches/{batch['id']}/cancel").status_code == 200
    wait_status(client, batch["id"], ("cancelled",))
    assert client.delete(f"/v1/files/{file_id}").status_code == 200


def test_openai_client_lists_files_with_purpose_order_and_pages(server, client, tmp_path):
    openai = pytest.importorskip("openai")
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    path = tmp_path / "list.jsonl"
    path.write_bytes(batch_lines(3, prefix="list-"))
    mine = [oa.files.create(file=path.open("rb"), purpose="batch").id for _ in range(3)]
    page = oa.files.list(limit=2)  # newest first by default, as OpenAI's
    assert [f.id for f in page.data] == mine[::-1][:2] and page.has_more is True
    every = [f.id for f in oa.files.list(limit=2)]  # the client follows `after` through every page
    assert every[:3] == mine[::-1] and len(every) == len(set(every))
    assert set(every) == {f["id"] for f in client.get("/v1/files").json()["data"]}  # default: all of them
    ascending = [f.id for f in oa.files.list(order="asc", limit=100)]
    assert ascending == every[::-1]
    assert [f.id for f in oa.files.list(after=mine[2], limit=1).data] == [mine[1]]  # one page: .data
    assert [f.id for f in oa.files.list(order="asc", after=mine[0], limit=1).data] == [mine[1]]
    run = run_batch(client, batch_lines(2, prefix="listed-"))
    done = wait_status(client, run["id"], ("completed",))
    outputs = [f for f in oa.files.list(purpose="batch_output")]
    assert done["output_file_id"] in [f.id for f in outputs] and all(f.purpose == "batch_output" for f in outputs)
    assert done["output_file_id"] not in [f.id for f in oa.files.list(purpose="batch")]
    assert all(f.purpose == "batch" for f in oa.files.list(purpose="batch"))
    for bad, param in [({"limit": 0}, "limit"), ({"limit": 10_001}, "limit"), ({"limit": "x"}, "limit"),
                       ({"order": "newest"}, "order"), ({"after": "file-nope"}, "after")]:
        r = client.get("/v1/files", params=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


CUSTOM_TEMPLATE = ("{% for m in messages %}[[{{ m['role'] | upper }} SAYS: {{ m['content'] }}]] {% endfor %}"
                   "[[ASSISTANT ANSWERS IN THE CUSTOM TEMPLATE'S WORDS:]]")


def chat_lines(n):
    return "\n".join(json.dumps({"custom_id": f"t{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": {"messages": [{"role": "user", "content": f"hello {i}"}],
                                           "max_tokens": 2}}) for i in range(n)).encode()


def test_chat_lines_use_the_servers_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from sglang_batchllm import bundled_model

    template = tmp_path / "custom.jinja"
    template.write_text(CUSTOM_TEMPLATE)
    s = Server(tmp_path / "jobs", extra_args=("--chat-template", str(template)))
    try:
        with s.client() as c:
            batch = run_batch(c, chat_lines(3), endpoint="/v1/chat/completions")
            done = wait_status(c, batch["id"], ("completed", "failed"))
            assert done["status"] == "completed", done
            lines = {json.loads(x)["custom_id"]: json.loads(x)
                     for x in c.get(f"/v1/files/{done['output_file_id']}/content").text.splitlines()}
    finally:
        s.stop()
    tok = AutoTokenizer.from_pretrained(bundled_model.model_dir())
    for i in range(3):
        messages = [{"role": "user", "content": f"hello {i}"}]
        custom = tok.apply_chat_template(messages, chat_template=CUSTOM_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
        own = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert "USER SAYS: hello" in custom and custom != own
        want = len(tok(custom, add_special_tokens=False)["input_ids"])
        assert want != len(tok(own, add_special_tokens=False)["input_ids"])  # the test can tell them apart
        assert lines[f"t{i}"]["response"]["body"]["usage"]["prompt_tokens"] == want


def test_chat_batches_are_refused_with_a_builtin_chat_template(tmp_path):
    s = Server(tmp_path / "jobs", extra_args=("--chat-template", "chatml"))
    try:
        with s.client() as c:
            file_id = upload(c, chat_lines(2)).json()["id"]
            r = c.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                            "completion_window": "24h"})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == "chat_template_unsupported" and error["param"] == "endpoint"
            assert "built-in conversation template 'chatml'" in error["message"]
            assert "--chat-template FILE.jinja" in error["message"]
            assert c.get("/v1/batches").json()["data"] == []  # nothing was created
            ok = run_batch(c, batch_lines(2))  # completions batches still run
            assert wait_status(c, ok["id"], ("completed",))["request_counts"]["completed"] == 2
    finally:
        s.stop()
