"""`python -m sglang_batchllm.plan` and the batch-file reader: formats, bad lines, the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sglang_batchllm.plan import main
from sglang_batchllm.planner import PlannerConfig, build_plan
from sglang_batchllm.jobs.reader import read_lines
from sglang_batchllm.jobs.records import BatchFileError


def read_batch(lines, encoder=None, on_error="stop", default_max_new_tokens=128, source="<batch>"):
    result = read_lines(lines, source, encoder=encoder, on_error=on_error, default_max_new_tokens=default_max_new_tokens)
    return [r.plan for r in result.requests], result.errors

SHARED = list(range(1000, 1100))  # 100 tokens


def native_lines(groups=3, members=4):
    out = []
    for g in range(groups):
        for m in range(members):
            ids = [5000 + g] + SHARED + [g, m, 7]
            out.append(json.dumps({"id": f"g{g}m{m}", "input_ids": ids, "max_new_tokens": 10 * (g + 1)}))
    return out


def write(tmp_path, lines, name="batch.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


class FakeEncoder:
    """Characters as token ids; a chat is its contents joined by '|'."""

    def encode(self, text):
        return [ord(c) for c in text]

    def encode_chat(self, messages):
        return self.encode("|".join(m["content"] for m in messages) + "|assistant:")


# ---- the reader ------------------------------------------------------------------------------


def test_reads_native_and_openai_lines():
    lines = [
        json.dumps({"input_ids": [1, 2, 3]}),
        "",
        json.dumps({"id": 7, "text": "abc", "sampling_params": {"max_new_tokens": 5, "temperature": 0}}),
        json.dumps({"custom_id": "c1", "method": "POST", "url": "/v1/completions",
                    "body": {"model": "m", "prompt": [4, 5], "max_tokens": 9}}),
        json.dumps({"custom_id": "c2", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3}}),
        json.dumps({"custom_id": "c3", "body": {"prompt": ["xy"]}}),
    ]
    reqs, errors = read_batch(lines, encoder=FakeEncoder(), default_max_new_tokens=11)
    assert errors == []
    got = [(r.rid, list(r.input_ids), r.max_new_tokens) for r in reqs]
    assert got == [
        ("line-1", [1, 2, 3], 11),
        ("7", [97, 98, 99], 5),
        ("c1", [4, 5], 9),
        ("c2", FakeEncoder().encode("hi|assistant:"), 3),
        ("c3", [120, 121], 11),
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"input_ids": [1], "max_tokens": 3}), "unknown field(s) 'max_tokens'"),
        (json.dumps({"input_ids": [1], "text": "a"}), "exactly one of 'input_ids' and 'text'"),
        (json.dumps({"id": "x"}), "exactly one of 'input_ids' and 'text'"),
        (json.dumps({"input_ids": []}), "empty prompt"),
        (json.dumps({"input_ids": [1, 2.5]}), "token 1 is 2.5"),
        (json.dumps({"input_ids": [1, True]}), "contains true/false"),
        (json.dumps({"input_ids": "1 2"}), "must be a list of token ids"),
        (json.dumps({"input_ids": [1], "max_new_tokens": -2}), "max_new_tokens must be >= 0"),
        (json.dumps({"input_ids": [1], "id": [1]}), "'id' must be a string or an integer"),
        (json.dumps({"text": "abc"}), "needs a tokenizer; pass --tokenizer"),
        (json.dumps({"custom_id": "c", "body": {"prompt": ["a", "b"]}}), "one prompt per line"),
        (json.dumps({"custom_id": "c", "body": {}}), "body needs 'prompt'"),
        (json.dumps({"custom_id": "c", "url": "/v1/embeddings", "body": {"prompt": [1]}}), "not supported"),
        (json.dumps({"custom_id": "c", "body": {"prompt": [1]}, "extra": 1}), "unknown field(s) 'extra'"),
    ],
)
def test_bad_lines_say_what_and_where(line, message):
    lines = [json.dumps({"input_ids": [1, 2]}), line]
    with pytest.raises(BatchFileError, match="b.jsonl:2: ") as info:
        read_batch(lines, source="b.jsonl")
    assert message in str(info.value) and str(info.value).startswith("b.jsonl:2: ")
    reqs, errors = read_batch(lines, on_error="skip")
    assert [r.rid for r in reqs] == ["line-1"] and [e.line for e in errors] == [2] and message in errors[0].message


def test_duplicate_ids_name_the_first_line():
    lines = [json.dumps({"id": "a", "input_ids": [1]}), json.dumps({"id": "b", "input_ids": [1]}),
             json.dumps({"id": "a", "input_ids": [2]})]
    with pytest.raises(BatchFileError, match=r":3: duplicate custom_id 'a' \(first on line 1\)"):
        read_batch(lines)


def test_a_failing_tokenizer_is_a_line_error():
    class NoTemplate(FakeEncoder):
        def encode_chat(self, messages):
            raise ValueError("no chat template")

    line = json.dumps({"custom_id": "c", "body": {"messages": [{"role": "user", "content": "x"}]}})
    with pytest.raises(BatchFileError, match=":1: the tokenizer failed on 'body.messages': no chat template"):
        read_batch([line], encoder=NoTemplate())


# ---- the command -----------------------------------------------------------------------------


def test_report(tmp_path, capsys):
    path = write(tmp_path, native_lines())
    assert main([path, "--kv-tokens", "150", "--compare-paper"]) == 0
    out = capsys.readouterr().out
    assert "12 requests" in out and "3 shared prefixes hold 12 requests" in out
    assert "saving" in out and "file order" in out and "plan order" in out and "paper's rule" in out
    assert "3 x 4  (groups x requests)" in out


def test_lru_simulation_says_what_its_numbers_are(tmp_path, capsys):
    """--kv-tokens: the simulated LRU figures are labelled as the cache WITHOUT the plan, and each
    is set against the plan's physical prefill, so a reader cannot take one for a plan that lost."""
    path = write(tmp_path, native_lines())
    assert main([path, "--kv-tokens", "100000", "--top", "0"]) == 0
    out = capsys.readouterr().out
    physical = build_plan(read_batch(native_lines())[0], PlannerConfig()).metrics.physical_prefill_tokens
    assert "without the plan: SGLang's LRU prefix cache alone" in out and "simulated" in out
    assert "one request at a time, the cache's best case" in out
    assert f"as many as the plan's {physical:,}" in out or f"more than the plan's {physical:,}" in out
    assert f"the plan's {physical:,} is its physical prefill" in out
    assert "vs this plan" not in out
    # a cache figure below the plan's says where it comes from
    assert main([path, "--kv-tokens", "100000", "--min-prefix", "1000", "--top", "0"]) == 0
    out = capsys.readouterr().out
    assert "fewer than the plan's" in out and "prefixes the plan does not share" in out


@pytest.mark.parametrize("argv, message", [
    (["--prefill-tokens", "8192"], "--prefill-tokens sets the LRU simulation's prefill batch; it needs --kv-tokens"),
    (["--token-ids"], "--token-ids adds token ids to the JSON output; it needs --json"),
    (["--json", "--top", "3"], "--top limits the report's list"),
])
def test_a_flag_that_needs_another_is_an_error(tmp_path, capsys, argv, message):
    path = write(tmp_path, native_lines())
    with pytest.raises(SystemExit) as exc:
        main([path, *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_json_matches_the_library(tmp_path, capsys):
    lines = native_lines()
    path = write(tmp_path, lines)
    assert main([path, "--json", "--page-size", "8", "--min-prefix", "16", "--kv-tokens", "1000"]) == 0
    out = json.loads(capsys.readouterr().out)
    reqs, _ = read_batch(lines)
    plan = build_plan(reqs, PlannerConfig(page_size=8, min_prefix_tokens=16))
    for key in ("physical_prefill_tokens", "logical_prefill_tokens", "saving", "groups", "order"):
        assert out[key] == plan.to_dict()[key]
    assert [g["prefix_len"] for g in out["groups"]] == [96, 96, 96]
    assert out["lru_cache"]["kv_tokens"] == 1000 and out["skipped_lines"] == []
    assert out["lru_cache"]["plan_physical_prefill_tokens"] == out["physical_prefill_tokens"]


def test_stop_and_skip(tmp_path, capsys):
    lines = native_lines(1, 2) + ['{"input_ids": [1], "oops": 1}'] + native_lines(2, 2)[2:]
    path = write(tmp_path, lines)
    assert main([path]) == 1
    err = capsys.readouterr().err
    assert f"{path}:3: unknown field(s) 'oops'" in err and "--on-error skip" in err
    assert main([path, "--on-error", "skip", "--json"]) == 0
    captured = capsys.readouterr()
    assert f"{path}:3: unknown field(s) 'oops'" in captured.err
    out = json.loads(captured.out)
    assert len(out["order"]) == 4 and out["skipped_lines"][0]["line"] == 3


def test_bad_flags_exit_2(tmp_path, capsys):
    path = write(tmp_path, native_lines(1, 2))
    for argv in ([path, "--page-size", "0"], [path, "--levels", "x"], [path, "--on-error", "ignore"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert main([str(tmp_path / "missing.jsonl")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_text_and_chat_with_the_bundled_tokenizer(tmp_path, capsys):
    pytest.importorskip("transformers")
    from sglang_batchllm.bundled_model import model_dir

    doc = "The quick brown fox jumps over the lazy dog. " * 20
    lines = [json.dumps({"id": f"t{i}", "text": doc + f"Question {i}?"}) for i in range(3)]
    lines += [json.dumps({"custom_id": f"c{i}", "body": {"messages": [{"role": "user", "content": doc + str(i)}]}})
              for i in range(3)]
    path = write(tmp_path, lines)
    assert main([path, "--tokenizer", model_dir(), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["order"]) == 6 and out["saving"] > 0.5
    assert sorted(len(g["members"]) for g in out["groups"] if g["prefix_len"]) == [3, 3]


def test_runs_as_a_module(tmp_path):
    path = write(tmp_path, native_lines())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-m", "sglang_batchllm.plan", path, "--json"],
                          capture_output=True, text=True, check=True, env=env)
    assert json.loads(done.stdout)["logical_prefill_tokens"] == 12 * 104


def test_levels_and_min_prefix_default_to_the_batchllm_settings(monkeypatch):
    from sglang_batchllm.plan import parse_args

    monkeypatch.setenv("SGLANG_BATCHLLM_LEVELS", "2")
    monkeypatch.setenv("SGLANG_BATCHLLM_MIN_PREFIX_TOKENS", "64")
    args = parse_args(["batch.jsonl"])
    assert (args.levels, args.min_prefix) == (2, 64)
    assert parse_args(["batch.jsonl", "--levels", "1"]).levels == 1


# ---- what a new user ran into (issue 10) ----------------------------------------------------


def test_invalid_utf8_and_null_bodies_are_line_errors(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    good = "\n".join(native_lines(1, 2)).encode()
    path.write_bytes(good + b'\n{"text": "caf\xe9"}\n{"custom_id": "c", "body": null}\n{"custom_id": "d", "body": 4}\n')
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:3: invalid UTF-8" in err and "Traceback" not in err
    assert main([str(path), "--on-error", "skip", "--json"]) == 0
    captured = capsys.readouterr()
    assert f"{path}:4: 'body' must be an object, got null" in captured.err
    assert f"{path}:5: 'body' must be an object, got a number" in captured.err
    assert [e["line"] for e in json.loads(captured.out)["skipped_lines"]] == [3, 4, 5]


def test_an_empty_file_says_so(tmp_path, capsys):
    assert main([write(tmp_path, [""])]) == 1
    assert "has no requests" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [(["--levels", "99"], "levels"), (["--min-prefix", "0"], "min_prefix_tokens")])
def test_levels_and_min_prefix_take_the_settings_limits(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main([write(tmp_path, native_lines(1, 2)), *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_deep_levels_warn(tmp_path, capsys):
    assert main([write(tmp_path, native_lines(1, 2)), "--levels", "3"]) == 0
    assert "optimal up to 2 levels" in capsys.readouterr().err


def test_json_into_a_closed_pipe_is_quiet(tmp_path):
    path = write(tmp_path, native_lines(40, 20))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(f"{sys.executable} -m sglang_batchllm.plan {path} --json --token-ids | head -c 10",
                          shell=True, capture_output=True, text=True, env=env)
    assert len(done.stdout) == 10 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
