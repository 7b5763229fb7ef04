"""The batch API's two settings in the one typed config: a path and a size, server-only flags."""

import pytest

from sglang_batchllm.batch_api.store import default_jobs_dir
from sglang_batchllm.config import BatchLLMConfig, ConfigError, cli_fields


def test_settings_come_from_the_environment_and_are_checked():
    config = BatchLLMConfig.from_env({"SGLANG_BATCHLLM_JOBS_DIR": " /data/My Jobs", "SGLANG_BATCHLLM_MAX_UPLOAD_MB": "5"})
    assert (config.jobs_dir, config.max_upload_mb) == (" /data/My Jobs", 5)  # a path is taken as written
    assert BatchLLMConfig.from_env(config.to_env()) == config
    with pytest.raises(ConfigError, match="max_upload_mb.*out of range"):
        BatchLLMConfig(max_upload_mb=0)
    with pytest.raises(ConfigError, match="jobs_dir.*must be a string"):
        BatchLLMConfig(jobs_dir=3)


def test_server_settings_are_flags_of_the_launcher_only():
    every = {f.name for f in cli_fields(server=True)}
    shared = {f.name for f in cli_fields()}
    assert every - shared == {"jobs_dir", "max_upload_mb"}


def test_batch_command_does_not_offer_them(capsys):
    from sglang_batchllm.batch import _parser

    text = _parser().format_help()
    assert "--batchllm-levels" in text and "--batchllm-jobs-dir" not in text


def test_default_jobs_dir_is_under_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_jobs_dir() == str(tmp_path / "sglang_batchllm" / "jobs")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_jobs_dir() == str(tmp_path / "home" / ".cache" / "sglang_batchllm" / "jobs")
