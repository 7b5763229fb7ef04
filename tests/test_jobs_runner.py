"""The batch command with the fake engine: OpenAI output, errors file, windows, --ordered,
resume, a different input refused, torn lines repaired, and kills mid-run (SIGKILL, SIGINT)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sglang_batchllm.batch import main
from sglang_batchllm.jobs.output import META_SUFFIX

SHARED = list(range(100, 164))  # 64 tokens


def lines(n=12, groups=3, fail=()):
    out = []
    for i in range(n):
        g = i % groups
        cid = f"fake-fail-{i}" if i in fail else f"r{i:03d}"
        if i % 2:
            out.append(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                                   "body": {"prompt": [10 + g] + SHARED + [i + 1], "max_tokens": 3}}))
        else:
            out.append(json.dumps({"id": cid, "input_ids": [10 + g] + SHARED + [i + 1], "max_new_tokens": 5}))
    return out


def write(tmp_path, rows, name="in.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f]


def run(*argv):
    return main([*map(str, argv), "--fake-engine", "--progress", "off"])


def test_output_is_openai_batch_output(tmp_path, capsys):
    src, out = write(tmp_path, lines()), tmp_path / "out.jsonl"
    assert run(src, "-o", out, "--window", 5) == 0
    rows = read_jsonl(out)
    assert sorted(r["custom_id"] for r in rows) == [f"r{i:03d}" for i in range(12)]
    for r in rows:
        assert r["error"] is None and r["response"]["status_code"] == 200 and r["id"].startswith("batch_req_")
        body = r["response"]["body"]
        assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] in ("stop", "length")
        u = body["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] == 66 + u["completion_tokens"]
    err = capsys.readouterr().err
    assert "done: 12 requests answered, 0 failed" in err and "prefill saving" in err
    assert json.loads((tmp_path / ("out.jsonl" + META_SUFFIX)).read_text())["input"]["size"] == os.path.getsize(src)


def test_windows_follow_the_plan_and_ordered_keeps_input_order(tmp_path, monkeypatch):
    from sglang_batchllm.jobs import engines

    seen = []
    real = engines.FakeBackend.generate

    async def spy(self, window):
        seen.append([r.custom_id for r in window])
        async for item in real(self, window):
            yield item

    monkeypatch.setattr(engines.FakeBackend, "generate", spy)
    src, out = write(tmp_path, lines()), tmp_path / "out.jsonl"
    assert run(src, "-o", out, "--window", 4, "--ordered") == 0
    assert [len(w) for w in seen] == [4, 4, 4]
    assert [sorted(int(c[1:]) % 3 for c in w) for w in seen] == [[0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 2, 2]], \
        "a window holds one group: windows are cut along the plan order"
    assert [r["custom_id"] for r in read_jsonl(out)] == [f"r{i:03d}" for i in range(12)]


def test_chat_lines_get_chat_completion_bodies(tmp_path):
    pytest.importorskip("transformers")
    row = json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 2}})
    src, out = write(tmp_path, [row]), tmp_path / "out.jsonl"
    assert run(src, "-o", out) == 0
    (r,) = read_jsonl(out)
    body = r["response"]["body"]
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"


def test_failures_and_skipped_lines_go_to_the_errors_file(tmp_path):
    rows = lines(fail={4}) + ['{"input_ids": [1], "oops": 1}']
    src, out = write(tmp_path, rows), tmp_path / "out.jsonl"
    assert run(src, "-o", out) == 1  # bad line, --on-error stop: nothing runs
    assert not out.exists()
    assert run(src, "-o", out, "--on-error", "skip") == 1  # one request failed
    errors = read_jsonl(str(out) + ".errors.jsonl")
    assert {e["custom_id"] for e in errors} == {None, "fake-fail-4"}
    assert all(e["response"] is None and e["error"]["code"] and e["error"]["message"] for e in errors)
    assert any(f"{src}:13: unknown field(s) 'oops'" in e["error"]["message"] for e in errors)
    assert len(read_jsonl(out)) == 11


def test_rerun_skips_done_and_another_input_is_refused(tmp_path, capsys):
    src, out = write(tmp_path, lines()), tmp_path / "out.jsonl"
    assert run(src, "-o", out) == 0
    first = out.read_bytes()
    assert run(src, "-o", out) == 0
    assert out.read_bytes() == first and "12 already in the output" in capsys.readouterr().err
    other = write(tmp_path, lines(13), "other.jsonl")
    assert run(other, "-o", out) == 1
    assert "holds results of another input" in capsys.readouterr().err and out.read_bytes() == first
    (tmp_path / "stray.jsonl").write_text('{"custom_id": "x"}\n')
    assert run(src, "-o", tmp_path / "stray.jsonl") == 1
    assert "has no .meta.json record" in capsys.readouterr().err


def test_a_torn_last_line_is_truncated_and_rerun(tmp_path, capsys):
    src, out = write(tmp_path, lines()), tmp_path / "out.jsonl"
    assert run(src, "-o", out) == 0
    data = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(data[:5]) + data[5][:40])  # a kill inside a write
    capsys.readouterr()
    assert run(src, "-o", out) == 0
    assert "removed a partial last line" in capsys.readouterr().err
    ids = [r["custom_id"] for r in read_jsonl(out)]
    assert sorted(ids) == [f"r{i:03d}" for i in range(12)]


def test_empty_file_and_dry_run(tmp_path, capsys):
    empty = write(tmp_path, [""], "empty.jsonl")
    assert run(empty, "-o", tmp_path / "o.jsonl") == 1
    assert "has no requests" in capsys.readouterr().err
    src = write(tmp_path, lines())
    assert main([src, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "12 requests" in out and "pinned KV" in out and "GiB of KV" in out
    with pytest.raises(SystemExit) as info:
        main([src])  # no -o
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main([src, "--dry-run", "--batchllm-levels", "99"])
    assert info.value.code == 2


def test_flags_a_dry_run_does_not_use_are_named(tmp_path, capsys):
    src = write(tmp_path, lines())
    assert main([src, "--dry-run", "--ordered", "--errors", str(tmp_path / "e.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "warning: --dry-run runs and writes nothing, so --errors, --ordered have no effect" in err
    assert not (tmp_path / "e.jsonl").exists()
    with pytest.raises(SystemExit) as exc:
        main([src, "-o", str(tmp_path / "o.jsonl"), "--fake-delay", "0.1"])
    assert exc.value.code == 2 and "--fake-delay is the fake engine's" in capsys.readouterr().err


def test_dry_run_imports_nothing_heavy(tmp_path):
    src = write(tmp_path, lines())
    code = ("import sys; from sglang_batchllm.batch import main; rc = main([%r, '--dry-run']);"
            "heavy = [m for m in ('torch', 'sglang', 'triton') if m in sys.modules]; print(heavy); sys.exit(rc)") % src
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_mid_run_loses_nothing_and_the_rerun_completes(tmp_path, sig):
    n = 60
    src, out = write(tmp_path, lines(n, groups=4)), tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "sglang_batchllm.batch", src, "-o", str(out), "--fake-engine", "--fake-delay",
           "0.05", "--progress", "off", "--window", "16"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size == 0):
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "run the same command again" in err, err
        assert "Traceback" not in err
    data = out.read_bytes()
    assert data.endswith(b"\n")
    partial = [r["custom_id"] for r in read_jsonl(out)]
    assert 0 < len(partial) < n and len(set(partial)) == len(partial)
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)  # the same command
    assert done.returncode == 0, done.stderr
    ids = [r["custom_id"] for r in read_jsonl(out)]
    assert sorted(ids) == sorted(f"r{i:03d}" for i in range(n)), "every custom_id exactly once"
    assert ids[: len(partial)] == partial


def test_the_engine_backend_reads_retractions_from_the_scheduler_state_at_shutdown():
    """SGLangBackend asks SGLang's internal state (one dict per DP rank) for the counters our
    scheduler patch adds, before the engine goes; a rank without them gives None, not 0."""
    import asyncio

    from sglang_batchllm.jobs.engines import SGLangBackend, retractions_of

    class TokenizerManager:
        def __init__(self, states):
            self.states = states

        async def get_internal_state(self):
            return self.states

    class Engine:
        def __init__(self, states):
            self.loop = asyncio.new_event_loop()
            self.tokenizer_manager = TokenizerManager(states)
            self.down = False

        def shutdown(self):
            self.down = True

    for states, want in (([{"batchllm": {"retractions": 2}}, {"batchllm": {"retractions": 5}}], 7),
                         ([{"batchllm": {"retractions": 2}}, {"last_gen_throughput": 1.0}], None),
                         ([], None)):
        backend = SGLangBackend.__new__(SGLangBackend)  # no GPU engine: the seam's stand-in
        backend.engine, backend.retractions = Engine(states), None
        backend.shutdown()
        assert backend.retractions == want and backend.engine.down
        assert retractions_of(states) == want
