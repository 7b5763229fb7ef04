"""runner.run_workloads with a fake engine injected: one generate call per workload with all its
requests, warm-up and cache flushes outside the timed window, per-step data cut to it."""

import json

import pytest

from sglang_batchllm import bundled_model
from sglang_batchllm.bench.fake import FakeEngine
from sglang_batchllm.bench.model import ModelShape
from sglang_batchllm.bench.runner import (
    BASE_ENGINE_KWARGS,
    ENGINES,
    RunSpec,
    engine_result,
    run_workloads,
)
from sglang_batchllm.bench.workloads import WorkloadSpec


@pytest.fixture(scope="module")
def model():
    return ModelShape.from_config_dir(bundled_model.model_dir())


@pytest.fixture
def workloads(model):
    return WorkloadSpec("authors", scale=0.01).build(model) + WorkloadSpec("control", scale=0.05).build(model)


def test_runs_each_workload_as_one_batch(tmp_path, model, workloads):
    steps = tmp_path / "steps.jsonl"
    engine = FakeEngine(str(steps), batch_size=16)
    runs = run_workloads(engine, workloads, steps, model.token_range(), progress="off")
    assert len(engine.generate_calls) == 2 + len(workloads)  # two warm-up batches, then one per workload
    assert all(rid.startswith("warmup/") for call in engine.generate_calls[:2] for rid in call)
    assert [set(c) for c in engine.generate_calls[2:]] == [{r.rid for r in w.requests} for w in workloads]
    assert engine.flushes == len(workloads)
    for w, run in zip(workloads, runs):
        assert run.name == w.name and run.fingerprint == w.fingerprint()
        assert run.wall_s > 0 and run.complete_log
        assert run.outputs == {r.rid: engine.tokens(r.input_ids, r.max_new_tokens, r.rid) for r in w.requests}
        assert run.prompt_tokens == w.prompt_tokens and run.completion_tokens == w.output_tokens
        # the window holds this workload's steps only (not the warm-up's, not the other workload's)
        assert run.steps["prefill_tokens"] == w.prompt_tokens
        assert run.steps["decode_tokens"] == w.output_tokens - w.num_requests
        assert run.series["t"][0] >= 0 and run.series["t"][-1] <= run.wall_s
        assert run.steps["kv_total"] == 1_000_000
        assert run.driver == {"driver": "one-call", "calls": 1}
        assert "pinned_tokens" not in run.series and run.steps["peak_pinned_tokens"] is None  # a vanilla fake


def test_batchllm_counters_cover_the_window_only(tmp_path, model, workloads):
    """BatchLLM's counters are cumulative in the scheduler: each workload gets its own share."""
    steps = tmp_path / "steps.jsonl"
    engine = FakeEngine(str(steps), fake_as="batchllm", batch_size=1024)
    authors, control = run_workloads(engine, workloads, steps, model.token_range())
    assert authors.steps["batchllm_prefix_tokens_computed"] == 4 * 2000  # 4 groups, one batch: each prefix once
    assert authors.steps["peak_groups_live"] == 4 and authors.steps["peak_pinned_tokens"] == 4 * 2000
    assert control.steps["batchllm_prefix_tokens_computed"] == 0 and control.steps["peak_groups_live"] == 0
    assert authors.series["pinned_tokens"][0] == 4 * 2000 and len(authors.series["groups_live"]) == authors.steps["steps"]


def test_no_warmup_and_lines_progress(tmp_path, model, workloads, capsys):
    steps = tmp_path / "steps.jsonl"
    engine = FakeEngine(str(steps))
    runs = run_workloads(engine, workloads[:1], steps, model.token_range(), progress="lines", warmup=False)
    assert len(engine.generate_calls) == 1 and runs[0].steps["steps"] > 0
    assert workloads[0].name in capsys.readouterr().err  # the bar, on stderr


def test_engine_result_and_spec_round_trip(tmp_path, model, workloads):
    steps = tmp_path / "steps.jsonl"
    spec = RunSpec("fake", {"fake_as": "batchllm"}, bundled_model.model_dir(), [WorkloadSpec("control", scale=0.05).to_dict()],
                   {workloads[1].name: workloads[1].fingerprint()}, str(steps), str(tmp_path / "r.json"), driver="waves")
    spec.save(tmp_path / "spec.json")
    assert RunSpec.load(tmp_path / "spec.json") == spec
    engine = ENGINES["fake"](spec.steps_path, spec.engine_kwargs)
    runs = run_workloads(engine, workloads[1:], steps, model.token_range(), driver=spec.driver)
    result = json.loads(json.dumps(engine_result(spec, engine, 1.5, runs)))
    assert result["engine_class"] == "sglang_batchllm.bench.fake.FakeEngine" and result["driver"] == "waves"
    assert result["workloads"][0]["driver"]["driver"] == "waves"
    assert result["scheduler"]["batchllm_active"] is True and result["scheduler"]["kv_total"] == 1_000_000
    assert result["workloads"][0]["wall_s"] == pytest.approx(runs[0].wall_s)


def test_engine_kwargs_follow_the_baseline():
    """docs/baseline.md: dummy weights, input_ids, pytorch sampling, no grammar, 0.80 static memory;
    every keyword must be a ServerArgs field."""
    import dataclasses

    from sglang.srt.server_args import ServerArgs

    fields = {f.name for f in dataclasses.fields(ServerArgs)}
    assert set(BASE_ENGINE_KWARGS) | {"model_path", "attention_backend"} <= fields
    assert BASE_ENGINE_KWARGS["load_format"] == "dummy" and BASE_ENGINE_KWARGS["skip_tokenizer_init"] is True
    assert BASE_ENGINE_KWARGS["mem_fraction_static"] == 0.80
