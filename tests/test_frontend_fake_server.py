"""The fake SGLang HTTP server the frontend tests run against (it lives in
sglang_batchllm/bench/fake_http.py, so that `scripts/bench_run_batch.py --fake-server` runs against
it too), and a sanity test of it. The other frontend tests import `FakeServer` from here."""

from __future__ import annotations

from sglang_batchllm.bench.fake_http import FakeServer, fake_output  # noqa: F401


def test_fake_server_single_and_batch_agree():
    import requests

    with FakeServer() as srv:
        assert requests.get(srv.url + "/get_model_info").json()["model_path"] == "fake/model"
        sp = {"max_new_tokens": 16, "stop": ["\n"]}
        one = requests.post(srv.url + "/generate", json={"text": "hello", "sampling_params": sp}).json()
        both = requests.post(
            srv.url + "/generate", json={"text": ["x", "hello"], "sampling_params": [sp, sp]}
        ).json()
        assert both[1] == one and isinstance(one["text"], str)
        bad = requests.post(srv.url + "/generate", json={"text": ["ok", "FAIL500"], "sampling_params": sp})
        assert bad.status_code == 500
        assert len(srv.generate_bodies()) == 3


def test_fake_server_health_and_metrics():
    import requests

    with FakeServer(batchllm=True) as srv:
        assert requests.get(srv.url + "/health").status_code == 200
        sp = {"max_new_tokens": 4}
        requests.post(srv.url + "/generate", json={"text": ["shared a", "shared b"], "sampling_params": sp})
        text = requests.get(srv.url + "/metrics").text
        assert 'sglang:num_requests_total{model_name="fake/model"} 2' in text
        assert 'sglang:batchllm_prefix_tokens_planned_total{model_name="fake/model"} 7' in text
    with FakeServer() as srv:
        assert "batchllm" not in requests.get(srv.url + "/metrics").text
