"""GPU smoke test: sglang_batchllm.Engine on the bundled model gives plain sglang.Engine's
greedy outputs (same model, same seeded dummy weights, same requests).

Run on a GPU machine: `pytest -m gpu tests/test_gpu_smoke.py -s`."""

import gc

import pytest

pytestmark = pytest.mark.gpu

TEXT_PROMPTS = [
    "Summarize the following article in one sentence.",
    "Question: What does the planner do? Answer:",
    "The quick brown fox",
]
SAMPLING = {"temperature": 0.0, "max_new_tokens": 24, "ignore_eos": True}


def _engine_kwargs():
    from sglang_batchllm.bundled_model import model_dir

    return dict(
        model_path=model_dir(),
        load_format="dummy",
        attention_backend="triton",
        sampling_backend="pytorch",
        grammar_backend="none",
        mem_fraction_static=0.3,
        disable_cuda_graph=True,
        random_seed=0,
        log_level="error",
    )


def _token_prompts():
    import random

    rng = random.Random(0)
    shared = [rng.randrange(10, 600) for _ in range(40)]
    return [shared + [rng.randrange(10, 600) for _ in range(n)] for n in (1, 7, 19, 33)]


def _generate(engine):
    text = engine.generate(prompt=TEXT_PROMPTS, sampling_params=SAMPLING)
    ids = engine.generate(input_ids=_token_prompts(), sampling_params=SAMPLING)
    return [o["output_ids"] for o in text], [o["text"] for o in text], [o["output_ids"] for o in ids]


def _run(engine_cls, **extra):
    import torch

    engine = engine_cls(**_engine_kwargs(), **extra)
    try:
        return _generate(engine)
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def test_batchllm_engine_matches_plain_sglang_greedy():
    import sglang

    import sglang_batchllm

    plain = _run(sglang.Engine)
    ours = _run(sglang_batchllm.Engine)
    text_ids, texts, token_ids = ours
    assert len(text_ids) == len(TEXT_PROMPTS) and len(token_ids) == len(_token_prompts())
    assert all(len(ids) == SAMPLING["max_new_tokens"] for ids in text_ids + token_ids)
    assert all(isinstance(t, str) for t in texts)
    assert ours == plain
    print("\ntext prompt outputs:", texts)
    print("token-id prompt outputs (first 8 ids):", [ids[:8] for ids in token_ids])
