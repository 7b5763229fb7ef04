"""The one batch-file reader: both line formats, every bad-input case as `FILE:LINE: reason`."""

from __future__ import annotations

import json

import pytest

from sglang_batchllm.jobs.reader import read_file, read_lines
from sglang_batchllm.jobs.records import CHAT, COMPLETIONS, BatchFileError
from sglang_batchllm.planner.tokens import TokenIds


class CharEncoder:
    """Characters as token ids; a chat is its contents joined by '|'."""

    def encode(self, text):
        return [ord(c) for c in text]

    def encode_chat(self, messages):
        return self.encode("|".join(m["content"] for m in messages) + "|assistant:")


def openai(cid, body, url=COMPLETIONS, **extra):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body, **extra})


def write_bytes(tmp_path, data: bytes, name="in.jsonl"):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_both_formats_map_to_sglang_sampling_params():
    lines = [
        openai("a", {"model": "m", "prompt": "hi", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9,
                     "stop": "\n", "seed": 3, "n": 1}),
        openai("b", {"messages": [{"role": "user", "content": "yo"}], "max_completion_tokens": 7}, url=CHAT),
        json.dumps({"id": 9, "input_ids": [1, 2], "sampling_params": {"max_new_tokens": 4, "top_k": 5}}),
        json.dumps({"text": "abc"}),
    ]
    result = read_lines(lines, "f.jsonl", encoder=CharEncoder(), default_max_new_tokens=11)
    reqs = result.requests
    assert [r.custom_id for r in reqs] == ["a", "b", "9", "line-4"]
    assert [r.url for r in reqs] == [COMPLETIONS, CHAT, COMPLETIONS, COMPLETIONS]
    assert reqs[0].sampling_params() == {"max_new_tokens": 5, "temperature": 0.5, "top_p": 0.9, "stop": ["\n"],
                                         "sampling_seed": 3}
    assert reqs[1].plan.input_ids == CharEncoder().encode("yo|assistant:")
    assert reqs[2].sampling_params() == {"max_new_tokens": 4, "top_k": 5}
    assert reqs[3].max_new_tokens == 11 and [r.line for r in reqs] == [1, 2, 3, 4]
    assert all(isinstance(r.plan.input_ids, TokenIds) for r in reqs), "token ids stay packed"


def test_file_identity_bom_and_blank_lines(tmp_path):
    body = b'{"input_ids": [1, 2]}\n\n   \n{"input_ids": [3]}'  # no final newline
    path = write_bytes(tmp_path, b"\xef\xbb\xbf" + body)
    result = read_file(path)
    assert [r.line for r in result.requests] == [1, 4] and result.lines == 2
    import hashlib

    assert result.size == len(body) + 3 and result.sha256 == hashlib.sha256(b"\xef\xbb\xbf" + body).hexdigest()


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"input_ids": [1], "id": "caf\xe9"}', "invalid UTF-8 at byte 30"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),  # a BOM is accepted on line 1 only
        (b"[1, 2]", "expected a JSON object, got an array"),
        (b"7", "expected a JSON object, got a number"),
        (b'"x"', "expected a JSON object, got a string"),
        (b"null", "expected a JSON object, got null"),
        (b'{"custom_id": "c", "body": null}', "'body' must be an object, got null"),
        (b'{"custom_id": "c", "body": 3}', "'body' must be an object, got a number"),
        (b'{"custom_id": "c", "body": [1]}', "'body' must be an object, got an array"),
        (b'{"custom_id": "c"}', "needs a 'body' object"),
        (openai("c", {"prompt": [1]}, method="GET").encode(), "method 'GET' is not supported"),
        (openai("c", {"prompt": [1]}, url="/v1/embeddings").encode(), "url '/v1/embeddings' is not supported"),
        (openai("c", {"prompt": [1]}, url=CHAT).encode(), "body needs 'messages'"),
        (openai("c", {"messages": [{"role": "user", "content": "x"}]}).encode(), "chats go to /v1/chat/completions"),
        (openai("c", {"prompt": ""}).encode(), "empty prompt"),
        (openai("c", {"prompt": []}).encode(), "empty prompt"),
        (openai("c", {"messages": []}, url=CHAT).encode(), "empty 'body.messages'"),
        (openai("c", {"messages": [{"content": "x"}]}, url=CHAT).encode(), "'role' and 'content'"),
        (openai("c", {"prompt": [1], "logprobs": 2}).encode(), "unknown body field(s) 'logprobs'"),
        (openai("c", {"prompt": [1]}, extra=1).encode(), "unknown field(s) 'extra'"),
        (b'{"input_ids": [1], "max_tokens": 3}', "unknown field(s) 'max_tokens'"),
        (b'{"input_ids": [1], "sampling_params": {"temp": 1}}', "unknown sampling_params field(s) 'temp'"),
        (openai("c", {"prompt": [1], "max_tokens": -1}).encode(), "body.max_tokens must be >= 1, got -1"),
        (openai("c", {"prompt": [1], "max_tokens": 2.5}).encode(), "body.max_tokens must be an integer, got 2.5"),
        (openai("c", {"prompt": [1], "max_tokens": "9"}).encode(), "must be an integer, got '9'"),
        (openai("c", {"prompt": [1], "max_tokens": True}).encode(), "must be an integer, got True"),
        (b'{"input_ids": [1], "max_new_tokens": -2}', "max_new_tokens must be >= 0"),
        (b'{"input_ids": [1, -3]}', "token 1 is -3"),
        (b'{"input_ids": [1, 2.5]}', "token 1 is 2.5"),
        (b'{"input_ids": [1, true]}', "contains true/false"),
        (openai("c", {"prompt": [1], "n": 2}).encode(), "body.n = 2: one completion per line only"),
        (openai("c", {"prompt": [1], "stream": True}).encode(), "'stream': true is not supported"),
        (openai("c", {"prompt": [1], "temperature": "hot"}).encode(), "body.temperature must be a number"),
        (openai("c", {"prompt": [1], "top_p": 0}).encode(), "body.top_p = 0 is out of range"),
        (openai("c", {"prompt": [1], "stop": [""]}).encode(), "body.stop must be"),
        (openai(["c"], {"prompt": [1]}).encode(), "'custom_id' must be a string or an integer, got an array"),
        (openai("", {"prompt": [1]}).encode(), "'custom_id' is empty"),
        (openai("long", {"prompt": list(range(100))}).encode(), "the prompt has 100 tokens; the model's context is 100"),
        (openai("fit", {"prompt": list(range(90)), "max_tokens": 20}).encode(), "exceed the model's context of 100"),
        (openai("first", {"prompt": [2]}).encode(), "duplicate custom_id 'first' (first on line 1)"),
    ],
)
def test_every_bad_line_says_file_line_and_reason(tmp_path, line, message):
    first = openai("first", {"prompt": [1]}).encode()
    path = write_bytes(tmp_path, first + b"\n" + line + b"\n" + openai("last", {"prompt": [3]}).encode() + b"\n")
    with pytest.raises(BatchFileError) as info:
        read_file(path, context_len=100)
    assert str(info.value).startswith(f"{path}:2: ") and message in str(info.value), str(info.value)
    result = read_file(path, on_error="skip", context_len=100)
    assert [r.custom_id for r in result.requests] == ["first", "last"]
    assert [(e.line, str(e)) for e in result.errors] == [(2, str(info.value))]


def test_text_without_a_tokenizer_is_a_line_error():
    with pytest.raises(BatchFileError, match=r"f:1: 'body.prompt' needs a tokenizer"):
        read_lines([openai("c", {"prompt": "hello"})], "f")


def test_an_empty_file_is_an_error(tmp_path):
    for data in (b"", b"\n\n  \n", b"\xef\xbb\xbf"):
        with pytest.raises(BatchFileError, match="has no requests"):
            read_file(write_bytes(tmp_path, data))
    with pytest.raises(BatchFileError, match="cannot read it"):
        read_file(str(tmp_path / "missing.jsonl"))


def test_invalid_utf8_is_found_anywhere_in_the_file(tmp_path):
    lines = [json.dumps({"input_ids": [i + 1]}).encode() for i in range(50)]
    lines[37] = b'{"text": "\xff\xfe"}'
    result = read_file(write_bytes(tmp_path, b"\n".join(lines)), on_error="skip")
    assert [e.line for e in result.errors] == [38] and len(result.requests) == 49


# ---- text lines are tokenized in batches -------------------------------------------------------


class BatchCharEncoder(CharEncoder):
    """CharEncoder with `encode_batch`; a text containing 'BOOM' makes the tokenizer fail."""

    def __init__(self):
        self.batches = []

    def encode(self, text):
        if "BOOM" in text:
            raise RuntimeError("the tokenizer exploded")
        return super().encode(text)

    def encode_batch(self, texts):
        self.batches.append(len(texts))
        return [self.encode(t) for t in texts]


def _mixed_lines(n):
    """Text lines (both formats), token-id lines and bad lines interleaved."""
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            out.append(json.dumps({"id": f"n{i}", "text": f"text line {i}"}))
        elif kind == 1:
            out.append(openai(f"o{i}", {"prompt": f"prompt {i}", "max_tokens": 3}))
        elif kind == 2:
            out.append(json.dumps({"id": f"t{i}", "input_ids": [1, 2, i + 3]}))
        elif kind == 3:
            out.append(openai(f"b{i}", {"prompt": "BOOM" if i % 2 else "", "max_tokens": 3}))  # bad
        else:
            out.append(json.dumps({"id": f"n{i - 4}", "text": "again"}))  # duplicate of line i-3
    return out


def test_batched_tokenizing_keeps_file_order_and_line_errors():
    from sglang_batchllm.jobs.tokenizer import BATCH_LINES

    lines = _mixed_lines(1500)
    batched = BatchCharEncoder()
    got = read_lines(lines, "f.jsonl", encoder=batched, on_error="skip")
    one_at_a_time = BatchCharEncoder()
    one_at_a_time.encode_batch = None  # an encoder without encode_batch: the reader's line-by-line path
    want = read_lines(lines, "f.jsonl", encoder=one_at_a_time, on_error="skip")
    assert [(r.line, r.index, r.custom_id, r.plan.input_ids.tolist(), r.max_new_tokens) for r in got.requests] == \
        [(r.line, r.index, r.custom_id, r.plan.input_ids.tolist(), r.max_new_tokens) for r in want.requests]
    assert [str(e) for e in got.errors] == [str(e) for e in want.errors]
    assert len(got.requests) == 900 and len(got.errors) == 600
    assert "f.jsonl:4: the tokenizer failed on 'body.prompt': the tokenizer exploded" in {str(e) for e in got.errors}
    assert "f.jsonl:5: duplicate custom_id 'n0' (first on line 1); ids must be unique" in {str(e) for e in got.errors}
    texts = 1500 * 3 // 5  # kinds 0, 1, 4 are text; the failing ones (BOOM) never reach the batch
    assert sum(batched.batches) >= texts - 1500 // 10 and max(batched.batches) <= BATCH_LINES
    assert len(batched.batches) < texts // BATCH_LINES + 8  # batches, not lines (+ line-by-line redos)


def test_batched_tokenizing_stops_at_the_first_bad_line_in_file_order():
    lines = [json.dumps({"id": f"n{i}", "text": f"line {i}"}) for i in range(10)]
    lines.insert(5, json.dumps({"id": "x", "input_ids": "nope"}))  # line 6, after five queued texts
    with pytest.raises(BatchFileError, match=r"^f:6: 'input_ids' must be a list of token ids"):
        read_lines(lines, "f", encoder=BatchCharEncoder())


def test_the_bundled_tokenizer_batches_the_same_ids_as_one_at_a_time():
    from sglang_batchllm import bundled_model
    from sglang_batchllm.jobs.tokenizer import HFEncoder

    enc = HFEncoder(bundled_model.model_dir())
    texts = ["The quick brown fox", "jumps over", "the lazy dog. " * 40, "a", "<s> special?", "ünïcödé"]
    assert enc.encode_batch(texts) == [enc.encode(t) for t in texts]
    assert enc.encode_batch([]) == [] and enc.encode_batch(["one"]) == [enc.encode("one")]


def test_token_id_lines_behind_a_text_line_do_not_pile_up():
    from sglang_batchllm.jobs.reader import Reader
    from sglang_batchllm.jobs.tokenizer import BATCH_LINES

    enc = BatchCharEncoder()
    reader = Reader("f", encoder=enc)
    reader.feed(1, json.dumps({"id": "text", "text": "hello"}))
    for n in range(2, 10 * BATCH_LINES):
        reader.feed(n, json.dumps({"id": f"t{n}", "input_ids": [1, n]}))
        assert len(reader._queue) <= 4 * BATCH_LINES
    result = reader.finish()
    assert [r.index for r in result.requests] == list(range(10 * BATCH_LINES - 1))
    assert result.requests[0].plan.input_ids.tolist() == [ord(c) for c in "hello"]


CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a page?"}],
    [{"role": "user", "content": "ünïcödé and emoji 🙂"}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "again <|eot|> with a special token's text inside"}],
    [{"role": "user", "content": "  leading spaces\nand\ttabs  "}],
    [{"role": "user", "content": "The planner looks at the whole batch. " * 30}],
]


def test_bundled_tokenizer_renders_then_batch_encodes_chats_as_encode_chat_does():
    from sglang_batchllm import bundled_model
    from sglang_batchllm.jobs.tokenizer import HFEncoder

    enc = HFEncoder(bundled_model.model_dir())
    rendered = [enc.render_chat(m) for m in CHATS]
    assert enc.encode_batch(rendered, add_special_tokens=False) == [enc.encode_chat(m) for m in CHATS]
    # the two settings are checked apart: a plain batch after a chat batch still gets encode's ids
    assert enc.encode_batch(["plain text", "more"]) == [enc.encode("plain text"), enc.encode("more")]


def test_chat_lines_batched_with_text_lines_give_the_ids_of_one_at_a_time():
    from sglang_batchllm import bundled_model
    from sglang_batchllm.jobs.tokenizer import BATCH_LINES, HFEncoder

    lines = []
    for i in range(3 * BATCH_LINES + 17):
        kind = i % 4
        if kind == 0:
            lines.append(openai(f"c{i}", {"messages": CHATS[i % len(CHATS)] + [{"role": "user", "content": f"n{i}"}]},
                                url=CHAT))
        elif kind == 1:
            lines.append(json.dumps({"id": f"t{i}", "text": f"text line {i}"}))
        elif kind == 2:
            lines.append(openai(f"e{i}", {"messages": []}, url=CHAT))  # bad: no messages
        else:
            lines.append(json.dumps({"id": f"i{i}", "input_ids": [5, 6, i + 7]}))
    batched = HFEncoder(bundled_model.model_dir())
    calls = []
    real = batched.encode_batch
    batched.encode_batch = lambda texts, **kw: calls.append(kw) or real(texts, **kw)
    got = read_lines(lines, "f.jsonl", encoder=batched, on_error="skip")
    one_at_a_time = HFEncoder(bundled_model.model_dir())
    one_at_a_time.encode_batch = None  # the reader's line-by-line path: encode / encode_chat
    want = read_lines(lines, "f.jsonl", encoder=one_at_a_time, on_error="skip")
    assert [(r.line, r.custom_id, r.url, r.plan.input_ids.tolist()) for r in got.requests] == \
        [(r.line, r.custom_id, r.url, r.plan.input_ids.tolist()) for r in want.requests]
    assert [str(e) for e in got.errors] == [str(e) for e in want.errors] and len(want.errors) == len(lines) // 4
    assert {"add_special_tokens": False} in calls  # chats went through the batch
    assert len(calls) <= 2 * (len(lines) // (2 * BATCH_LINES) + 2)  # batches, not lines


class NoTemplateBatchEncoder(BatchCharEncoder):
    def render_chat(self, messages):
        raise RuntimeError("no chat template here")


def test_a_chat_the_template_cannot_render_is_its_own_line_error():
    lines = [json.dumps({"id": "a", "text": "fine"}),
             openai("b", {"messages": [{"role": "user", "content": "hi"}]}, url=CHAT)]
    got = read_lines(lines, "f", encoder=NoTemplateBatchEncoder(), on_error="skip")
    assert [r.custom_id for r in got.requests] == ["a"]
    assert [str(e) for e in got.errors] == ["f:2: the tokenizer failed on 'body.messages': no chat template here"]
