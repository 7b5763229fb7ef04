"""scripts/bench_batch.py's command line: argument checks, the engines' keywords and
environments, and the whole pipeline on a CPU with `--fake-engine` (real child processes)."""

import json

import pytest

from sglang_batchllm.bench import cli
from sglang_batchllm.bench.launch import vanilla_env

SMALL = ["--fake-engine", "--bundled-model", "--workload", "control", "--scale", "0.02", "--matmul-tflops", "100", "--no-progress"]


def test_bad_arguments_say_what_to_do(capsys):
    for argv, message in [
        (["--workload", "author"], "unknown workload 'author'"),
        (["--engine-arg", "novalue"], "expected KEY=VALUE"),
        (["--match-fraction", "2"], "--match-fraction"),
        (["--bundled-model", "--model-config", "/x"], "not allowed with"),
        (["--batchllm", "levls=2"], "unknown BatchLLM setting(s) levls; known:"),
        (["--batchllm", "levels=0"], "out of range"),
        (["--engine-arg", "chunk_size=4096"], "not an sglang.Engine keyword"),
    ]:
        with pytest.raises(SystemExit):
            cli.parse_args(argv)
        assert message in capsys.readouterr().err


def test_uninstalled_vanilla_backend_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(cli, "backend_installed", lambda name: False)
    with pytest.raises(SystemExit):
        cli.parse_args(["--vanilla-backend", "fa3"])
    assert "not installed" in capsys.readouterr().err
    assert cli.parse_args(["--vanilla-backend", "triton"]).vanilla_backend == "triton"


def test_engine_kwargs():
    args = cli.parse_args(["--engine-arg", "chunked_prefill_size=4096", "--batchllm", "levels=2", "--vanilla-backend", "triton"])
    vanilla = cli.engine_kwargs(args, "/m", "vanilla")
    batchllm = cli.engine_kwargs(args, "/m", "batchllm")
    assert vanilla["model_path"] == batchllm["model_path"] == "/m"
    assert vanilla["chunked_prefill_size"] == batchllm["chunked_prefill_size"] == 4096
    assert vanilla["attention_backend"] == batchllm["attention_backend"] == "triton"
    assert batchllm["batchllm_levels"] == 2 and not any(k.startswith("batchllm_") for k in vanilla)
    assert {k: v for k, v in vanilla.items()} == {k: v for k, v in batchllm.items() if not k.startswith("batchllm_")}


def test_vanilla_env_leaves_batchllm_out():
    env = vanilla_env({"PATH": "/bin", "SGLANG_BATCHLLM_ENABLE": "1", "SGLANG_BATCHLLM_LEVELS": "2"}, ["batchllm", "other"])
    assert env == {"PATH": "/bin", "SGLANG_PLUGINS": "other"}
    assert vanilla_env({}, ["batchllm"])["SGLANG_PLUGINS"] == "__none__"  # empty would mean "all"
    assert vanilla_env({"SGLANG_PLUGINS": "batchllm, mine"}, ["batchllm", "mine", "x"])["SGLANG_PLUGINS"] == "mine"


def test_plugin_problems():
    ok = {"vanilla": {"scheduler": {"batchllm_active": False}}, "batchllm": {"scheduler": {"batchllm_active": True}}}
    assert cli.plugin_problems(ok, ("vanilla", "batchllm"), ("vanilla", "batchllm")) == []
    inert = {"vanilla": {"scheduler": {"batchllm_active": False}}, "batchllm": {"scheduler": {"batchllm_active": False}}}
    (problem,) = cli.plugin_problems(inert, ("vanilla", "batchllm"), ("vanilla", "batchllm"))
    assert "should be active in the batchllm run" in problem and "python -m pip install --no-deps -e ." in problem


def test_dry_run_starts_nothing(tmp_path, capsys):
    assert cli.main(["--dry-run", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "authors[x0.125]: 800 requests" in out and "prefill floor" in out
    assert not (tmp_path / "raw").exists()


def test_fake_pipeline_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(SMALL + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Reproduce with: python scripts/bench_batch.py --fake-engine --bundled-model --workload control" in printed
    record = json.loads((out / "result.json").read_text())
    assert record["ok"] and record["labels"] == ["vanilla", "batchllm"]
    (w,) = record["workloads"]
    assert w["name"] == "control[x0.02]" and w["num_requests"] == 10 and w["outputs"]["identical"] == 10
    assert w["runs"]["vanilla"]["prefill_tokens_computed"] == w["prompt_tokens"]
    assert record["engines"]["batchllm"]["scheduler"]["batchllm_active"] is True
    assert (out / "report.md").exists() and (out / "control_x0.02.png").exists()

    # the same command with --resume reuses both engine runs
    assert cli.main(SMALL + ["--out", str(out), "--resume"]) == 0
    assert capsys.readouterr().out.count("reusing") == 2

    # re-render from the JSON alone
    (out / "report.md").unlink()
    assert cli.main(["--report-only", str(out / "result.json")]) == 0
    assert (out / "report.md").exists()


def test_outputs_beyond_tolerance_exit_1(tmp_path, capsys):
    assert cli.main(SMALL + ["--out", str(tmp_path), "--batchllm", "fake_flip=0.5"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert not json.loads((tmp_path / "result.json").read_text())["ok"]


def test_inactive_plugin_exits_2_and_keeps_the_report(tmp_path, capsys):
    assert cli.main(SMALL + ["--out", str(tmp_path), "--batchllm", "fake_plugin_active=false"]) == 2
    assert "should be active" in capsys.readouterr().err
    assert "Problem:" in (tmp_path / "report.md").read_text()


def test_a_failing_engine_run_exits_2(tmp_path, capsys):
    assert cli.main(SMALL + ["--out", str(tmp_path), "--batchllm", "fake_crash=true"]) == 2
    err = capsys.readouterr().err
    assert "the batchllm run failed" in err and "Reproduce with:" in err
    assert (tmp_path / "raw" / "vanilla.json").exists()  # what finished is kept for --resume


def test_sigterm_stops_the_engine_process_too(tmp_path):
    """`timeout` sends SIGTERM: the running engine child (and what it started) must go too."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_batch.py"
    proc = subprocess.Popen([sys.executable, str(script), *SMALL, "--out", str(tmp_path), "--batchllm", "fake_step_sleep_s=0.05"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    children = []
    while time.monotonic() < deadline and not (tmp_path / "raw" / "batchllm.steps.jsonl").exists():
        time.sleep(0.05)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the batchllm engine process should be running"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in err
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert (tmp_path / "raw" / "vanilla.json").exists()
