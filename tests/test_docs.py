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


ROOT = Path(__file__).resolve().parents[1]
DOCS = {p.relative_to(ROOT).as_posix(): p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}


def test_docs_cited_by_docs_and_code_exist():
    import re

    texts = dict(DOCS)
    for folder in ("sglang_batchllm", "scripts"):
        texts.update({p.relative_to(ROOT).as_posix(): p.read_text() for p in (ROOT / folder).rglob("*.py")})
    for name, text in texts.items():
        for cited in set(re.findall(r"(?<![\w/])docs/[\w.-]+\.md", text)):
            assert (ROOT / cited).is_file(), f"{name} cites {cited}, which is not in the repository"


def test_documented_commands_run_as_written():
    """No machine-specific paths; no pytest flags from plugins the test extra does not install;
    a --no-build-isolation install says to install the build tools it needs."""
    for name, text in DOCS.items():
        assert "/work/" not in text and "/home/" not in text, name
        for line in text.splitlines():
            if "pytest" in line and " -n " in line:
                raise AssertionError(f"{name}: `pytest -n` needs pytest-xdist, not in the test extra: {line}")
            if "install" in line and "--no-build-isolation" in line and "-e ." in line:
                assert "wheel" in text[: text.index(line)], f"{name}: say to install wheel first: {line}"
