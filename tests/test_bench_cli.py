"""scripts/bench_batch.py's command line: argument checks, the engines' keywords and
environments, and the whole pipeline on a CPU with `--fake-engine` (real child processes)."""

import json

import pytest

from sglang_batchllm.bench import cli
from sglang_batchllm.bench.launch import vanilla_env

SMALL = ["--fake-engine", "--bundled-model", "--workload", "control", "--scale", "0.02", "--matmul-tflops", "100", "--no-progress"]
AUTHORS = SMALL[:3] + ["authors", "--scale", "0.01"] + SMALL[6:]  # 4 groups x 16, 2000 + 16 x (200 + 100) tokens each


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


@pytest.mark.parametrize("argv, message", [
    (["--report-only", "r.json", "--arms", "batchllm"], "--report-only re-renders a result.json and runs nothing; --arms"),
    (["--dry-run", "--resume"], "--dry-run starts no engine; --resume would have no effect"),
    (["--dry-run", "--fake-engine"], "--dry-run starts no engine; --fake-engine"),
])
def test_flags_that_would_do_nothing_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert message in capsys.readouterr().err
    cli.parse_args(["--report-only", "r.json", "--out", "x"])  # --out goes with it


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
    assert vanilla["attention_backend"] == "triton" and batchllm["attention_backend"] == "batchllm"
    assert batchllm["batchllm_levels"] == 2 and not any(k.startswith("batchllm_") for k in vanilla)
    same = {k: v for k, v in batchllm.items() if not k.startswith("batchllm_") and k != "attention_backend"}
    assert {k: v for k, v in vanilla.items() if k != "attention_backend"} == same
    triton = cli.engine_kwargs(cli.parse_args(["--batchllm-backend", "triton"]), "/m", "batchllm")
    assert triton["attention_backend"] == "triton"


def test_vanilla_env_leaves_batchllm_out():
    env = vanilla_env({"PATH": "/bin", "SGLANG_BATCHLLM_ENABLE": "1", "SGLANG_BATCHLLM_LEVELS": "2"}, ["batchllm", "other"])
    assert env == {"PATH": "/bin", "SGLANG_PLUGINS": "other"}
    assert vanilla_env({}, ["batchllm"])["SGLANG_PLUGINS"] == "__none__"  # empty would mean "all"
    assert vanilla_env({"SGLANG_PLUGINS": "batchllm, mine"}, ["batchllm", "mine", "x"])["SGLANG_PLUGINS"] == "mine"


def test_plugin_problems():
    ok = {"vanilla": {"scheduler": {"batchllm_active": False}}, "vanilla-waves": {"scheduler": {"batchllm_active": False}},
          "batchllm": {"scheduler": {"batchllm_active": True}}}
    assert cli.plugin_problems(ok) == []
    inert = {**ok, "batchllm": {"scheduler": {"batchllm_active": False}}}
    (problem,) = cli.plugin_problems(inert)
    assert "should be active in the batchllm run" in problem and "python -m pip install --no-deps -e ." in problem
    leaked = {**ok, "vanilla-waves": {"scheduler": {"batchllm_active": True}}}
    (problem,) = cli.plugin_problems(leaked)
    assert "should be inactive in the vanilla-waves run" in problem


def test_arms_option():
    assert cli.parse_args([]).arms == ("vanilla", "vanilla-waves", "batchllm")
    assert cli.parse_args(["--arms", "batchllm, vanilla"]).arms == ("batchllm", "vanilla")


@pytest.mark.parametrize("text, message", [("vanilla,waves", "unknown arm(s) waves; choose from vanilla, vanilla-waves"),
                                           ("vanilla,vanilla", "given twice"), (",", "(none given)")])
def test_bad_arms_say_what_to_do(capsys, text, message):
    with pytest.raises(SystemExit):
        cli.parse_args(["--arms", text])
    assert message in capsys.readouterr().err


def test_fake_engine_gets_the_pool_cap_and_batchllm_settings_only():
    args = cli.parse_args(["--fake-engine", "--engine-arg", "max_total_tokens=5000", "--engine-arg", "chunked_prefill_size=64",
                           "--batchllm", "fake_flip=0.5"])
    vanilla = cli.fake_engine_kwargs("vanilla", cli.engine_kwargs(args, "/m", "vanilla"))
    batchllm = cli.fake_engine_kwargs("batchllm", cli.engine_kwargs(args, "/m", "batchllm"))
    assert vanilla == {"fake_as": "vanilla", "max_total_tokens": 5000}
    assert batchllm == {"fake_as": "batchllm", "max_total_tokens": 5000, "batchllm_fake_flip": 0.5}


def test_dry_run_starts_nothing(tmp_path, capsys):
    assert cli.main(["--dry-run", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "authors[x0.125]: 800 requests" in out and "prefill floor" in out
    assert not (tmp_path / "raw").exists()


def test_fake_engine_needs_no_matmul_rate(tmp_path, monkeypatch):
    """--fake-engine alone runs (the documented command): it assumes the baseline H200's rate."""
    monkeypatch.setattr(cli, "measure_matmul", lambda out: pytest.fail("the fake engine measured a matmul"))
    argv = [a for a in SMALL if a not in ("--matmul-tflops", "100")]
    assert cli.main(argv + ["--arms", "vanilla", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["matmul"]["matmul_tflops"] == cli.FAKE_ENGINE_TFLOPS == 790.0
    assert "fake engine" in record["matmul"]["gemm"]


def test_fake_pipeline_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(SMALL + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Reproduce with: python scripts/bench_batch.py --fake-engine --bundled-model --workload control" in printed
    record = json.loads((out / "result.json").read_text())
    assert record["ok"] and record["arms"] == ["vanilla", "vanilla-waves", "batchllm"]
    (w,) = record["workloads"]
    assert w["name"] == "control[x0.02]" and w["num_requests"] == 10
    assert w["outputs"]["batchllm"]["identical"] == w["outputs"]["vanilla-waves"]["identical"] == 10
    assert set(w["ratios"]) == {"vanilla-waves", "batchllm"} and set(w["ratios"]["batchllm"]) == {"vanilla", "vanilla-waves"}
    assert w["runs"]["vanilla"]["prefill_tokens_computed"] == w["prompt_tokens"]
    # control shares nothing: the waves driver sends everything in its final call
    assert w["runs"]["vanilla-waves"]["driver"]["waves"] == 0 and w["runs"]["vanilla-waves"]["generate_calls"] == 1
    assert record["engines"]["batchllm"]["scheduler"]["batchllm_active"] is True
    assert record["engines"]["vanilla-waves"]["driver"] == "waves"
    assert (out / "report.md").exists() and (out / "control_x0.02.png").exists()

    # the same command with --resume reuses every arm
    assert cli.main(SMALL + ["--out", str(out), "--resume"]) == 0
    assert capsys.readouterr().out.count("reusing") == 3

    # re-render from the JSON alone; a record of the two-engine harness is refused
    (out / "report.md").unlink()
    assert cli.main(["--report-only", str(out / "result.json")]) == 0
    assert (out / "report.md").exists()
    old = out / "old.json"
    old.write_text(json.dumps({**record, "schema": 1}))
    assert cli.main(["--report-only", str(old)]) == 2
    assert "schema 1" in capsys.readouterr().err


def test_arms_run_in_separate_commands_combine_into_one_report(tmp_path, capsys):
    """How a full run fits 10-minute GPU commands: one arm per command, one report at the end."""
    out = ["--out", str(tmp_path)]
    assert cli.main(AUTHORS + out + ["--arms", "vanilla"]) == 0
    first = json.loads((tmp_path / "result.json").read_text())
    assert first["arms"] == ["vanilla"] and first["workloads"][0]["ratios"] == {}
    assert cli.main(AUTHORS + out + ["--arms", "batchllm"]) == 0
    assert "[vanilla] from an earlier command" in capsys.readouterr().out
    assert json.loads((tmp_path / "result.json").read_text())["arms"] == ["vanilla", "batchllm"]

    assert cli.main(AUTHORS + out + ["--arms", "vanilla-waves"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("from an earlier command") == 2 and "vs vanilla-waves" in printed
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["arms"] == ["vanilla", "vanilla-waves", "batchllm"] and record["ok"]
    (w,) = record["workloads"]
    assert set(w["ratios"]["batchllm"]) == {"vanilla", "vanilla-waves"} and set(w["ratios"]["vanilla-waves"]) == {"vanilla"}
    assert set(w["outputs"]) == {"vanilla-waves", "batchllm"} and all(c["ok"] for c in w["outputs"].values())
    waves = w["runs"]["vanilla-waves"]
    assert waves["driver"]["groups"] == 4 and waves["generate_calls"] == 2  # one wave: leaders, then the rest
    assert "--arms vanilla-waves" in record["engines"]["vanilla-waves"]["command"]
    assert "--arms vanilla" in record["engines"]["vanilla"]["command"]
    md = (tmp_path / "report.md").read_text()
    assert "| vs vanilla | vs vanilla-waves |" in md and "| authors[x0.01] | vanilla-waves |" in md
    assert "BatchLLM peak pinned tokens / groups live" in md

    # other settings: the earlier arms do not join (they ran other requests)
    assert cli.main(AUTHORS + ["--seed", "1"] + out + ["--arms", "batchllm"]) == 0
    assert "from an earlier command" not in capsys.readouterr().out
    assert json.loads((tmp_path / "result.json").read_text())["arms"] == ["batchllm"]


def test_a_small_pool_makes_several_waves(tmp_path):
    group_kv = 2000 + 16 * 300
    pool = int(2 * group_kv / 0.9) + 1  # two groups fit into 90% of it
    argv = AUTHORS + ["--out", str(tmp_path), "--arms", "vanilla,vanilla-waves", "--engine-arg", f"max_total_tokens={pool}"]
    assert cli.main(argv) == 0
    (w,) = json.loads((tmp_path / "result.json").read_text())["workloads"]
    waves = w["runs"]["vanilla-waves"]
    assert waves["driver"]["kv_pool_tokens"] == pool and waves["wave_groups"] == 2
    assert waves["driver"]["groups_per_wave"] == [2, 2] and waves["generate_calls"] == 4
    assert w["outputs"]["vanilla-waves"]["identical"] == 64


def test_outputs_beyond_tolerance_exit_1(tmp_path, capsys):
    assert cli.main(SMALL + ["--out", str(tmp_path), "--batchllm", "fake_flip=0.5"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert not json.loads((tmp_path / "result.json").read_text())["ok"]


def test_inactive_plugin_exits_2_and_keeps_the_report(tmp_path, capsys):
    assert cli.main(SMALL + ["--out", str(tmp_path), "--batchllm", "fake_plugin_active=false"]) == 2
    assert "should be active" in capsys.readouterr().err
    assert "Problem:" in (tmp_path / "report.md").read_text()


def test_a_failing_engine_run_exits_2(tmp_path, capsys):
    assert cli.main(SMALL + ["--out", str(tmp_path), "--arms", "vanilla,batchllm", "--batchllm", "fake_crash=true"]) == 2
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
    proc = subprocess.Popen([sys.executable, str(script), *SMALL, "--out", str(tmp_path), "--arms", "vanilla,batchllm",
                             "--batchllm", "fake_step_sleep_s=0.05"],
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
