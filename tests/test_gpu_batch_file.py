"""GPU: `python -m sglang_batchllm.batch` runs a 2,000-line file end to end on the bundled model
(its trained weights): completions and chat lines mixed, documents shared by many lines, every
custom_id answered exactly once, nothing in the errors file; running the same command again
finds everything done and writes nothing.

Run on a GPU machine: `pytest -m gpu tests/test_gpu_batch_file.py -s`."""

import json
import random
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.gpu

LINES = 2000
DOCUMENTS = 50


def _corpus_sentences():
    from pathlib import Path

    from sglang_batchllm.bundled_model import model_dir

    text = (Path(model_dir()) / "corpus.txt").read_text()
    return [s.strip() for s in text.replace("\n", " ").split(".") if len(s.split()) > 3]


def _write_batch(path):
    rng = random.Random(0)
    sentences = _corpus_sentences()
    docs = [" ".join(rng.sample(sentences, 8)) + "." for _ in range(DOCUMENTS)]
    with open(path, "w") as f:
        for i in range(LINES):
            doc = docs[i % DOCUMENTS]
            question = rng.choice(sentences)
            if i % 2:
                body = {"model": "bundled", "prompt": f"{doc}\nQuestion: {question}?\nAnswer:",
                        "max_tokens": 24, "temperature": 0}
                url = "/v1/completions"
            else:
                body = {"model": "bundled", "max_completion_tokens": 24, "temperature": 0,
                        "messages": [{"role": "system", "content": doc},
                                     {"role": "user", "content": question + "?"}]}
                url = "/v1/chat/completions"
            f.write(json.dumps({"custom_id": f"req-{i:04d}", "method": "POST", "url": url, "body": body}) + "\n")


def _run(inp, out):
    cmd = [sys.executable, "-m", "sglang_batchllm.batch", str(inp), "-o", str(out), "--progress", "off"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    return done, time.perf_counter() - start


def test_a_2000_line_file_comes_back_whole(tmp_path):
    inp, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    _write_batch(inp)
    done, seconds = _run(inp, out)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [line["custom_id"] for line in lines]
    assert sorted(ids) == [f"req-{i:04d}" for i in range(LINES)], "every custom_id exactly once"
    assert all(line["response"]["status_code"] == 200 for line in lines)
    texts = []
    for line in lines:
        body = line["response"]["body"]
        choice = body["choices"][0]
        texts.append(choice["text"] if body["object"] == "text_completion" else choice["message"]["content"])
    assert all(isinstance(t, str) for t in texts)
    errors = tmp_path / "results.jsonl.errors.jsonl"  # the command's default next to the output
    assert not errors.exists() or errors.read_text() == ""
    print(f"\n{LINES} lines in {seconds:.1f} s (engine start included); "
          f"{len(set(texts))} distinct answers; summary: {done.stderr.strip().splitlines()[-3:]}")
    # the same command again: everything is done, nothing is written twice
    before = out.read_text()
    again, _ = _run(inp, out)
    assert again.returncode == 0, again.stderr[-4000:]
    assert out.read_text() == before
