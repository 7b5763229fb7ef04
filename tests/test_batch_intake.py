"""Text batches go to the scheduler whole (patches/batch_intake.py), and the SGLang settings a
BatchLLM run defaults (sglang_batchllm/defaults.py)."""

from sglang.srt.managers.io_struct import GenerateReqInput

from sglang_batchllm.patches import batch_intake as intake
from sglang_batchllm.defaults import SERVER_DEFAULTS, with_default_flags, with_default_kwargs


def _batch(**kw):
    obj = GenerateReqInput(**kw)
    obj.normalize_batch_and_arguments()
    return obj


def test_plain_text_batch_takes_the_batch_path():
    text = _batch(text=["a b c", "a b d", "x"], sampling_params={"max_new_tokens": 4})
    assert intake.plain_text_batch(text.batch_size, text)


def test_batches_sglang_cannot_batch_keep_its_path():
    ids = _batch(input_ids=[[1, 2], [3]], sampling_params={"max_new_tokens": 4})
    assert not intake.plain_text_batch(ids.batch_size, ids), "token ids already go whole; not ours to change"
    images = _batch(text=["describe", "this"], image_data=[["data:image/png;base64,AAAA"], None],
                    sampling_params={"max_new_tokens": 4})
    assert not intake.plain_text_batch(images.batch_size, images), "multimodal batches would fail batch encoding"


def test_launcher_flags_default_unless_given():
    assert with_default_flags(["--port", "1"]) == ["--port", "1", "--radix-cache-backend", "batchllm",
                                                   "--attention-backend", "batchllm"]
    assert with_default_flags(["--attention-backend=triton"]) == ["--attention-backend=triton",
                                                                  "--radix-cache-backend", "batchllm"]


def test_engine_kwargs_default_unless_given():
    assert with_default_kwargs({"attention_backend": "triton"}) == {"attention_backend": "triton",
                                                                   "radix_cache_backend": "batchllm"}
    assert with_default_kwargs({"attention_backend": None}) == SERVER_DEFAULTS
    assert with_default_kwargs({"server_args": object()}).keys() == {"server_args"}
