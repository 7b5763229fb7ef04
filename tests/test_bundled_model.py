import json
import subprocess
import sys
from pathlib import Path

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
