"""The README stays true to the code: every setting is documented with its flag and variable."""

import dataclasses
from pathlib import Path

from sglang_batchllm.config import BatchLLMConfig, cli_fields, env_name, flag_name

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_in_the_readme():
    for f in dataclasses.fields(BatchLLMConfig):
        assert env_name(f.name) in README, f.name
    for f in cli_fields():
        assert flag_name(f.name) in README, f.name


def test_readme_test_command_is_what_ci_runs():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "python -m pytest -q tests" in README
    assert "python -m pytest -q tests" in ci
