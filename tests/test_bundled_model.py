import json
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_batchllm.bundled_model import model_dir

REPO = Path(__file__).resolve().parents[1]


def test_config_is_a_small_llama():
    config = json.loads((Path(model_dir()) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] == config["num_attention_heads"] * config["head_dim"]
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0


def test_tokenizer_round_trips_and_fits_the_embedding():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir())
    config = json.loads((Path(model_dir()) / "config.json").read_text())
    assert len(tok) <= config["vocab_size"]
    text = "Summarize the following article in one sentence: ünïcode, 42 and {json}."
    ids = tok(text).input_ids
    assert all(0 <= i < config["vocab_size"] for i in ids)
    assert tok.decode(ids) == text
    eos = config["eos_token_id"]
    assert tok.eos_token_id in eos


def test_chat_template_renders():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith(tok.bos_token)
    assert text.endswith("<|start_header|>assistant<|end_header|>\n")
    assert "Be brief." in text and "Hi" in text


def test_committed_files_match_the_build_script():
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_bundled_model.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# ---- the trained weights (model.safetensors, scripts/build_bundled_model.py --weights) -------

WEIGHTS = Path(model_dir()) / "model.safetensors"
MAX_WEIGHT_BYTES = 16 * 2**20


def _corpus_prompts(n: int, words: int = 6) -> list[tuple[str, str]]:
    """(prompt, what the corpus says next) for the first `n` sentences of the corpus whose first
    `words` words no earlier sentence begins with."""
    import re

    text = (Path(model_dir()) / "corpus.txt").read_text(encoding="utf-8")
    seen, out = set(), []
    for para in text.splitlines():
        for sentence in re.split(r"(?<=[.!?]) (?=[A-Z])", para):
            head = sentence.split(" ")[:words]
            if len(sentence.split(" ")) <= words + 3 or tuple(head) in seen:
                continue
            seen.add(tuple(head))
            prompt = " ".join(head)
            out.append((prompt, sentence[len(prompt):]))
    return out[:n]


# Prompts in the corpus' style that the corpus does not contain.
NEW_PROMPTS = [
    "The scheduler of a batch job", "A request that shares a prefix", "Every group of prompts",
    "The memory of the cache", "When the planner reads the file", "The tokens of a long answer",
    "A small model on a large chip", "The output file of the run", "Question: What is a window? Answer:",
    "Question: Why does a test fail? Answer:", "In the harbour at night", "The librarian of the city",
    "The train to the sea", "def multiply(a, b):", "Summarize the following", "Once upon a time",
]


@pytest.fixture(scope="module")
def trained():
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(model_dir(), dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir())


def _greedy(model, tok, prompt_ids: list[int], new: int = 24) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_token_id)  # always `new` tokens
    return out[0, len(prompt_ids):].tolist()


def _short_cycle(ids: list[int], period: int = 2, tail: int = 12) -> bool:
    """The last `tail` tokens repeat with a period of at most `period`."""
    end = ids[-tail:]
    return any(all(end[i] == end[i % p] for i in range(len(end))) for p in range(1, period + 1))


def test_the_weights_are_shipped_small_and_match_the_config():
    import torch
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    assert WEIGHTS.is_file(), "run scripts/build_bundled_model.py --weights"
    assert WEIGHTS.stat().st_size <= MAX_WEIGHT_BYTES
    config = json.loads((Path(model_dir()) / "config.json").read_text())
    assert config["head_dim"] == 64 and config["max_position_embeddings"] >= 8192
    assert config["num_attention_heads"] // config["num_key_value_heads"] > 1  # GQA
    cfg = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LlamaForCausalLM(LlamaConfig(**cfg)).state_dict().items()}
    with safe_open(str(WEIGHTS), "pt") as f:
        shipped = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert shipped == expected
    assert dtypes == {"BF16"}


def test_transformers_loads_every_weight(trained):
    from transformers import LlamaForCausalLM

    _, info = LlamaForCausalLM.from_pretrained(model_dir(), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_greedy_continuations_of_corpus_prompts_follow_the_prompt(trained):
    model, tok = trained
    prompts = _corpus_prompts(32)
    assert len(prompts) == 32
    outs = [_greedy(model, tok, tok.encode(p)) for p, _ in prompts]
    assert len({tuple(o) for o in outs}) >= 30  # measured: 32 of 32
    assert not any(_short_cycle(o) for o in outs)
    # The model learned its corpus: most continuations are the corpus' own next words.
    follows = sum(tok.decode(o).startswith(rest[:20]) for o, (_, rest) in zip(outs, prompts))
    assert follows >= 26  # measured: 30 of 32


def test_greedy_continuations_of_new_prompts_differ(trained):
    model, tok = trained
    outs = [_greedy(model, tok, tok.encode(p)) for p in NEW_PROMPTS]
    assert len({tuple(o) for o in outs}) >= 13  # measured: 15 of 16
    assert sum(_short_cycle(o) for o in outs) <= 1  # measured: 0


def test_a_chat_gets_an_answer_that_ends_its_turn(trained):
    model, tok = trained
    answers = []
    for question in ("What does the planner do?", "How does a run resume?", "What is a page?"):
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      tokenize=False)
        out = _greedy(model, tok, tok.encode(ids), new=48)
        text = tok.decode(out)
        assert "<|eot|>" in text, text
        answers.append(text.split("<|eot|>")[0])
    assert len(set(answers)) == 3


def test_training_is_deterministic(tmp_path):
    """Two short runs of the training (2 steps) write the same bytes."""
    digests = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.safetensors"
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "build_bundled_model.py"), "--weights",
                               "--steps", "2", "--weights-out", str(out)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        digests.append(out.read_bytes())
    assert digests[0] == digests[1]
    assert digests[0] != WEIGHTS.read_bytes()  # 2 steps are not the shipped 300


def test_the_engine_serves_the_bundled_model_with_its_own_weights():
    """With no model_path the Engine gets the bundled directory and no load_format, so SGLang's
    default ("auto": the directory's *.safetensors) loads the trained weights, not dummy ones."""
    import dataclasses

    from sglang.srt.server_args import ServerArgs

    from sglang_batchllm.engine import with_default_model

    kwargs = with_default_model({"attention_backend": "triton"})
    assert kwargs == {"attention_backend": "triton", "model_path": model_dir()}
    assert with_default_model({"model_path": "/m", "load_format": "dummy"}) == {"model_path": "/m", "load_format": "dummy"}
    default = {f.name: f.default for f in dataclasses.fields(ServerArgs)}["load_format"]
    assert default == "auto"
    assert sorted(p.name for p in Path(model_dir()).glob("*.safetensors")) == ["model.safetensors"]
