"""The production path: the batch API's router on SGLang 0.5.17's own app (what
`python -m sglang_batchllm.launch_server` serves), guarded by SGLang's API-key middleware, with
the in-process backend over the tokenizer manager."""

import asyncio
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sglang_batchllm.batch_api.mount import mount_on_sglang, unsupported
from sglang_batchllm.config import BatchLLMConfig

MOUNTED = r"""
import os, sys
os.environ["SGLANG_BATCHLLM_ENABLE"] = "1"
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.server_args import prepare_server_args
from sglang_batchllm.bundled_model import model_dir
args = prepare_server_args(["--model-path", model_dir(), "--device", "cpu", "--api-key", "k",
                            "--batchllm-jobs-dir", sys.argv[1], "--batchllm-max-upload-mb", "3"])
from sglang_batchllm.config import BatchLLMConfig
config = BatchLLMConfig.from_env()
assert (config.jobs_dir, config.max_upload_mb) == (sys.argv[1], 3), config
from sglang_batchllm.batch_api import router
from sglang_batchllm.batch_api.mount import mount_on_sglang
from sglang.srt.entrypoints import http_server
app = http_server.app
sglang_lifespan = app.router.lifespan_context
assert mount_on_sglang(args)
assert app.router.lifespan_context is not sglang_lifespan  # ours now runs inside SGLang's
ours = sorted((m, r.path.replace("{file_id}", "file-" + "0" * 24).replace("{batch_id}", "batch_" + "0" * 24))
              for r in router.routes for m in r.methods)
assert len(ours) == 9, ours
assert os.path.exists(os.path.join(sys.argv[1], "jobs.sqlite3"))  # opened before any model loads
# what SGLang's _setup_and_run_http_server does with --api-key, before uvicorn starts
from sglang.srt.utils.auth import add_api_key_middleware
add_api_key_middleware(app, api_key=args.api_key, admin_api_key=None)
from starlette.testclient import TestClient
client = TestClient(app)  # no lifespan run: the service is not started, so authorized calls get 503
for method, path in ours:  # every route of the router answers on SGLang's app
    assert client.request(method, path).status_code == 401, path
    r = client.request(method, path, headers={"Authorization": "Bearer k"})
    assert r.status_code == 503 and "not running" in r.json()["error"]["message"], (path, r.status_code, r.text)
# the factory the router's lifespan calls, on SGLang's global state
from sglang.srt.managers.tokenizer_manager import ServerStatus
tm = type("TM", (), {"served_model_name": "served", "context_len": 4096, "server_status": ServerStatus.Starting,
                     "rid_to_state": {}})()
http_server.set_global_state(http_server._GlobalState(tokenizer_manager=tm, template_manager=None, scheduler_info={}))
service = getattr(app.state, "batchllm_batches_factory")()
s = service.settings
assert (s.model, s.context_len, s.max_upload_bytes, s.tokenizer_path) == ("served", 4096, 3 << 20, model_dir()), s
assert not service.ready()
tm.server_status = ServerStatus.Up
assert service.ready()
assert type(service.backend).__name__ == "InProcessBackend" and service.backend.engine.tokenizer_manager is tm
# chats: the template SGLang's startup left on the tokenizer manager's tokenizer, or refused
from types import SimpleNamespace
assert (s.chat_template, s.chat_refused) == (None, None)
tm.tokenizer = SimpleNamespace(chat_template="{{ messages[0]['content'] }} (the --chat-template file)")
http_server.set_global_state(http_server._GlobalState(
    tokenizer_manager=tm, template_manager=SimpleNamespace(chat_template_name=None), scheduler_info={}))
s = getattr(app.state, "batchllm_batches_factory")().settings
assert s.chat_template.endswith("(the --chat-template file)") and s.chat_refused is None, s
http_server.set_global_state(http_server._GlobalState(
    tokenizer_manager=tm, template_manager=SimpleNamespace(chat_template_name="chatml"), scheduler_info={}))
s = getattr(app.state, "batchllm_batches_factory")().settings
assert s.chat_template is None and "built-in conversation template 'chatml'" in s.chat_refused, s
print("MOUNTED-OK")
"""


def test_router_is_mounted_on_sglangs_app_and_guarded_by_its_api_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_BATCHLLM_")}
    out = subprocess.run([sys.executable, "-c", MOUNTED, str(tmp_path / "jobs")], capture_output=True, text=True,
                         env=env, timeout=400)
    assert out.returncode == 0 and "MOUNTED-OK" in out.stdout, (out.stdout + out.stderr)[-4000:]


def test_modes_where_the_app_does_not_serve_turn_the_api_off(caplog):
    base = dict(tokenizer_worker_num=1, encoder_only=False, smg_grpc_mode=False, use_ray=False,
                skip_tokenizer_init=False)
    assert unsupported(SimpleNamespace(**base)) is None
    assert "tokenizer-worker-num" in unsupported(SimpleNamespace(**{**base, "tokenizer_worker_num": 2}))
    assert "--skip-tokenizer-init" in unsupported(SimpleNamespace(**{**base, "skip_tokenizer_init": True}))
    assert "--use-ray" in unsupported(SimpleNamespace(**{**base, "use_ray": True}))
    with caplog.at_level("WARNING"):
        assert mount_on_sglang(SimpleNamespace(**{**base, "encoder_only": True})) is False
    assert "is off: --encoder-only is set" in caplog.text


def test_unusable_jobs_dir_stops_the_launcher_with_a_message(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = SimpleNamespace(tokenizer_worker_num=1, encoder_only=False, smg_grpc_mode=False, use_ray=False,
                           skip_tokenizer_init=False)
    with pytest.raises(SystemExit, match="cannot use the jobs directory .*pass --batchllm-jobs-dir"):
        mount_on_sglang(args, BatchLLMConfig(jobs_dir=str(blocker / "jobs")))


class FakeTokenizerManager:
    """Streams each request's one final chunk, tagged with its index, `delay` apart."""

    def __init__(self, delay):
        self.delay, self.rid_to_state, self.aborted, self.objs = delay, {}, [], []

    async def generate_request(self, obj, request):
        assert request is None
        self.objs.append(obj)
        for rid in obj.rid:
            self.rid_to_state[rid] = object()
        for i, rid in enumerate(obj.rid):
            await asyncio.sleep(self.delay)
            del self.rid_to_state[rid]
            yield {"index": i, "text": f"answer {i}", "meta_info": {
                "finish_reason": {"type": "length"}, "prompt_tokens": len(obj.input_ids[i]),
                "completion_tokens": obj.sampling_params[i]["max_new_tokens"], "cached_tokens": 1}}

    def abort_request(self, rid):
        self.aborted.append(rid)


def window(n):
    from sglang_batchllm.jobs.reader import read_lines

    lines = [f'{{"id": "r{i}", "input_ids": [1, 2, {i + 3}], "max_new_tokens": 2}}' for i in range(n)]
    return read_lines(lines).requests


def test_in_process_backend_sends_one_batch_and_aborts_what_a_cancel_leaves():
    from sglang_batchllm.batch_api.engine import InProcessBackend

    tm = FakeTokenizerManager(delay=0.01)
    backend = InProcessBackend(tm, "served")
    reqs = window(6)

    async def all_of_it():
        return [x async for x in backend.generate(reqs)]

    got = asyncio.run(all_of_it())
    assert [i for i, _ in got] == list(range(6)) and got[0][1].text == "answer 0"
    assert got[0][1].completion_tokens == 2 and got[0][1].finish_reason == "length"
    (obj,) = tm.objs  # the whole window as one request object: one scheduler batch
    assert obj.input_ids == [r.plan.input_ids.tolist() for r in reqs] and obj.stream is True
    assert tm.aborted == []  # nothing left to abort

    async def cancelled_after_two():
        seen = []
        task = asyncio.ensure_future(_collect(backend.generate(reqs), seen))
        while len(seen) < 2:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen

    seen = asyncio.run(cancelled_after_two())
    rids = tm.objs[1].rid
    assert len(seen) >= 2 and sorted(tm.aborted) == sorted(rids[len(seen):])  # only the unfinished


async def _collect(gen, seen):
    async for item in gen:
        seen.append(item)
