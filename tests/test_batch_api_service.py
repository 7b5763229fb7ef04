"""The batch lifecycle in process (BatchService on a Store, the fake engine): one window per
file, resume without redoing finished requests, the state machine, the store's safety."""

import asyncio
import json
import os

import pytest

from batch_api_support import batch_lines
from sglang_batchllm import bundled_model
from sglang_batchllm.batch_api import ids
from sglang_batchllm.batch_api.objects import ApiError, batch_object
from sglang_batchllm.batch_api.service import BatchService, Settings
from sglang_batchllm.batch_api.store import JobsDirError, Store
from sglang_batchllm.jobs.engines import FakeBackend


def make(tmp_path, delay=0.0):
    store = Store(str(tmp_path / "jobs"))
    settings = Settings(max_upload_bytes=1 << 20, tokenizer_path=bundled_model.model_dir(), model="fake")
    backend = FakeBackend(delay=delay)
    return store, BatchService(store, settings, backend), backend


def add_input(store, data: bytes) -> str:
    relative = store.new_storage_name("files")
    with open(store.path(relative), "wb") as f:
        f.write(data)
    file_id = ids.new_id(ids.FILE_PREFIX)
    store.add_file({"id": file_id, "purpose": "batch", "filename": "in.jsonl", "bytes": len(data),
                    "created_at": 0, "path": relative})
    return file_id


async def until(store, batch_id, statuses, timeout=30):
    for _ in range(int(timeout / 0.01)):
        row = store.get_batch(batch_id)
        if row["status"] in statuses:
            return row
        await asyncio.sleep(0.01)
    raise AssertionError(f"{batch_id} stuck in {row['status']}")


async def until_running(store, batch_id, timeout=30):
    """Until the batch's job has written a result: `in_progress` alone may still mean queued."""
    for _ in range(int(timeout / 0.01)):
        row = store.get_batch(batch_id)
        if row["completed"] + row["failed"] > 0:
            return row
        await asyncio.sleep(0.01)
    raise AssertionError(f"{batch_id} never ran: {row}")


def create(service, file_id, endpoint="/v1/completions"):
    return service.create_batch({"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"})


def test_the_whole_file_goes_to_the_engine_as_one_window(tmp_path):
    store, service, backend = make(tmp_path)

    async def main():
        await service.start()
        row = create(service, add_input(store, batch_lines(300)))
        assert row["status"] == "validating"
        done = await until(store, row["id"], ("completed", "failed"))
        await service.stop()
        return done

    done = asyncio.run(main())
    assert done["status"] == "completed" and (done["total"], done["completed"], done["failed"]) == (300, 300, 0)
    assert len(backend.submitted) == 1 and sorted(backend.submitted[0]) == sorted(f"q{i}" for i in range(300))
    body = batch_object(done)
    assert body["request_counts"] == {"total": 300, "completed": 300, "failed": 0}
    assert body["errors"] is None and body["output_file_id"].startswith("file-")


def test_resume_submits_only_what_is_not_in_the_output(tmp_path):
    store, service, backend = make(tmp_path)
    file_id = add_input(store, batch_lines(50))
    row = create(service, file_id)  # not started: stays validating
    # what a killed server leaves: the batch in progress, 20 lines written (10 answers, 10 failures)
    store.update_batch(row["id"], status="in_progress", in_progress_at=1, total=50)
    folder = store.path(row["dir"])
    os.makedirs(folder)
    first = FakeBackend()
    from sglang_batchllm.jobs.output import error_line, open_output
    from sglang_batchllm.jobs.reader import read_file
    result = read_file(store.path(store.get_file(file_id)["path"]), encoder=service.encoder)
    identity = {"path": file_id, "size": result.size, "sha256": result.sha256}
    open_output(os.path.join(folder, "output.jsonl"), identity)
    open_output(os.path.join(folder, "errors.jsonl"), identity)
    from sglang_batchllm.jobs.output import response_line

    async def answers():
        return [x async for x in first.generate(result.requests[:10])]

    with open(os.path.join(folder, "output.jsonl"), "a") as f:
        for i, c in asyncio.run(answers()):
            f.write(response_line(result.requests[i], c, "fake"))
    with open(os.path.join(folder, "errors.jsonl"), "a") as f:
        for r in result.requests[10:20]:
            f.write(error_line(r.custom_id, "engine_error", "failed before the kill"))

    async def main():
        await service.start()
        done = await until(store, row["id"], ("completed", "failed"))
        await service.stop()
        return done

    done = asyncio.run(main())
    assert len(backend.submitted) == 1  # one window, in plan order, of exactly the 30 not yet done
    assert sorted(backend.submitted[0]) == sorted(r.custom_id for r in result.requests[20:])
    assert (done["status"], done["total"], done["completed"], done["failed"]) == ("completed", 50, 40, 10)
    out = [json.loads(x)["custom_id"] for x in open(os.path.join(folder, "output.jsonl"))]
    assert len(out) == len(set(out)) == 40


def test_cancel_before_the_turn_and_state_rules(tmp_path):
    store, service, _ = make(tmp_path, delay=0.01)

    async def main():
        await service.start()
        first = create(service, add_input(store, batch_lines(400, prefix="a")))
        second = create(service, add_input(store, batch_lines(5, prefix="b")))
        await until_running(store, first["id"])
        cancelled = await service.cancel(second["id"])  # still queued: cancelled at once, nothing ran
        assert cancelled["status"] == "cancelled" and cancelled["output_file_id"] is None
        with pytest.raises(ApiError) as err:
            await service.cancel(second["id"])
        assert err.value.status == 409
        running = await service.cancel(first["id"])
        assert running["status"] == "cancelling"
        done = await until(store, first["id"], ("cancelled",))
        await service.stop()
        return done

    done = asyncio.run(main())
    assert done["completed"] < 400 and done["cancelled_at"] and done["cancelling_at"]


def test_the_failed_status_carries_line_errors(tmp_path):
    store, service, _ = make(tmp_path)
    good = batch_lines(2).decode()
    file_id = add_input(store, (good + "[1, 2]\n").encode())  # a line the upload check would have refused

    async def main():
        await service.start()
        row = create(service, file_id)
        done = await until(store, row["id"], ("failed", "completed"))
        await service.stop()
        return done

    done = asyncio.run(main())
    assert done["status"] == "failed"
    assert done["errors"] == [{"code": "invalid_request", "line": 3, "param": None,
                               "message": "in.jsonl:3: expected a JSON object, got an array"}]


def test_store_paths_stay_inside_the_jobs_dir(tmp_path):
    store = Store(str(tmp_path / "jobs"))
    for bad in ("../x", "/etc/passwd", "files/../../x", "", "."):
        with pytest.raises(JobsDirError):
            store.path(bad)
    assert store.path("files/abc.jsonl") == os.path.join(store.root, "files", "abc.jsonl")
    assert not ids.is_id(ids.FILE_PREFIX, "file-../../etc") and not ids.is_id(ids.BATCH_PREFIX, "file-" + "0" * 24)
    assert ids.is_id(ids.FILE_PREFIX, ids.new_id(ids.FILE_PREFIX))
    with pytest.raises(JobsDirError, match="in use by another server"):
        Store(str(tmp_path / "jobs"))
    store.close()
    Store(str(tmp_path / "jobs")).close()  # free again once the first closed


def test_unusable_jobs_dir_says_what_to_do(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(JobsDirError, match="pass --batchllm-jobs-dir a writable directory"):
        Store(str(blocker / "jobs"))


class Clock:
    """The service's clock, moved by the test: expiry is reached without waiting for it."""

    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_a_batch_whose_window_passes_mid_job_expires_keeping_what_finished(tmp_path):
    store, _, backend = make(tmp_path, delay=0.01)
    clock = Clock()
    service = BatchService(store, Settings(max_upload_bytes=1 << 20, tokenizer_path=bundled_model.model_dir(),
                                           model="fake"), backend, clock=clock, expiry_poll=0.01)

    async def main():
        await service.start()
        row = create(service, add_input(store, batch_lines(400)))
        assert row["expires_at"] == int(clock.now) + 24 * 3600
        for _ in range(3000):
            if store.get_batch(row["id"])["completed"] >= 20:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # a few seconds of (fake) day left: nothing expires yet
        assert store.get_batch(row["id"])["status"] == "in_progress"
        clock.now += 24 * 3600
        done = await until(store, row["id"], ("expired", "completed", "failed"))
        await service.stop()
        return done

    done = asyncio.run(main())
    assert done["status"] == "expired", done
    body = batch_object(done)
    assert body["expired_at"] == int(clock.now) and body["completed_at"] is None
    folder = store.path(done["dir"])
    out = [json.loads(x) for x in open(os.path.join(folder, "output.jsonl"))]
    err = [json.loads(x) for x in open(os.path.join(folder, "errors.jsonl"))]
    assert 20 <= len(out) < 400 and all(x["response"]["status_code"] == 200 for x in out)
    assert err and all(x["error"]["code"] == "batch_expired" and x["response"] is None for x in err)
    assert "24h completion window ended" in err[0]["error"]["message"]
    assert sorted(x["custom_id"] for x in out + err) == sorted(f"q{i}" for i in range(400))  # each once
    assert body["request_counts"] == {"total": 400, "completed": len(out), "failed": len(err)}
    assert body["output_file_id"] and body["error_file_id"]
    assert store.get_file(body["error_file_id"])["purpose"] == "batch_output"


def test_a_queued_batch_is_validated_at_once_and_waits_in_progress(tmp_path):
    store, service, backend = make(tmp_path, delay=0.01)

    async def main():
        await service.start()
        first = create(service, add_input(store, batch_lines(400, prefix="a")))
        await until_running(store, first["id"])
        queued = create(service, add_input(store, batch_lines(5, prefix="b")))
        bad = create(service, add_input(store, batch_lines(3, prefix="c")), endpoint="/v1/chat/completions")
        assert queued["status"] == bad["status"] == "validating"
        waiting = await until(store, queued["id"], ("in_progress",))
        failed = await until(store, bad["id"], ("failed",))
        running = store.get_batch(first["id"])
        # both were decided while the first batch still ran, and the queued one has not started
        assert running["status"] == "in_progress" and running["completed"] < 400
        assert len(backend.submitted) == 1
        done = await until(store, queued["id"], ("completed",))
        await service.stop()
        return waiting, failed, done

    waiting, failed, done = asyncio.run(main())
    assert (waiting["total"], waiting["completed"], waiting["failed"]) == (5, 0, 0)
    assert waiting["in_progress_at"] is not None
    assert [e["line"] for e in failed["errors"]] == [1, 2, 3] and failed["errors"][0]["code"] == "invalid_url"
    assert done["completed"] == 5


def test_chat_batches_refused_where_the_server_template_cannot_be_applied(tmp_path):
    store = Store(str(tmp_path / "jobs"))
    settings = Settings(max_upload_bytes=1 << 20, tokenizer_path=bundled_model.model_dir(), model="fake",
                        chat_refused="because of the test")
    service = BatchService(store, settings, FakeBackend())
    file_id = add_input(store, batch_lines(2))
    with pytest.raises(ApiError) as err:
        create(service, file_id, endpoint="/v1/chat/completions")
    assert err.value.status == 400 and err.value.code == "chat_template_unsupported"
    assert err.value.message == "chat batches are refused on this server: because of the test"
    assert create(service, file_id)["status"] == "validating"  # completions batches are not affected
