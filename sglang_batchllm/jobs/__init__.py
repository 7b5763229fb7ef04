"""Batch files in and out: the one JSONL reader (OpenAI batch lines and native lines), the
OpenAI batch output writer with resume, the engine seam and the job runner behind
`python -m sglang_batchllm.batch`. Nothing here imports SGLang or torch at module level; only
`engines.SGLangBackend` does, when it starts."""
