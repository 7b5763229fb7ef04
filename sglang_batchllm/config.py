"""The one typed configuration of sglang_batchllm.

Every setting is a field of the frozen `BatchLLMConfig`. Each field carries its command-line
flag (`--batchllm-<name>`), its environment variable (`SGLANG_BATCHLLM_<NAME>`) and a one-line
help text, so flags, environment and docs come from this single table.

Why environment variables: SGLang runs its scheduler in *spawned* processes that re-import
everything and receive only a pickled `ServerArgs` (whose fields we must not extend). The
environment is inherited by every child, and by the DP controller's children too, so it is
the one channel that reaches every process that loads the plugin. This module is the only
place that reads or writes `SGLANG_BATCHLLM_*`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, MutableMapping

ENV_PREFIX = "SGLANG_BATCHLLM_"
FLAG_PREFIX = "--batchllm-"


class ConfigError(ValueError):
    """A BatchLLM setting has a value we cannot use; the message says which and what to do."""


def _setting(help: str, *, lo: int | None = None, hi: int | None = None, cli: bool = True, server: bool = False):
    # server=True: a setting of the HTTP server only (the batch API), so the batch command does not offer it
    return {"help": help, "lo": lo, "hi": hi, "cli": cli, "server": server}


@dataclass(frozen=True)
class BatchLLMConfig:
    enable: bool = field(
        default=False,
        metadata=_setting(
            "Turn BatchLLM on. The launcher and sglang_batchllm.Engine set it; plain `sglang` "
            "runs leave it off, and the plugin then changes nothing.",
            cli=False,
        ),
    )
    levels: int = field(
        default=1,
        metadata=_setting(
            "Levels of prefix sharing the planner keeps (1 = the paper's single level).",
            lo=1,
            hi=8,
        ),
    )
    min_prefix_tokens: int = field(
        default=32,
        metadata=_setting(
            "Shortest shared prefix, in tokens, worth a group; shorter ones run as plain requests.",
            lo=1,
        ),
    )

    schedule: bool = field(
        default=True,
        metadata=_setting(
            "Run the plan in SGLang's scheduler: prefix-first admission, pinned group prefixes, "
            "memory-reserving admission (0 = plugin on, vanilla scheduling; for comparisons).",
        ),
    )
    mixed: bool = field(
        default=True,
        metadata=_setting(
            "Let running decodes ride with the prefill chunks (mixed steps), except while more "
            "prompt work waits than one step takes and none of it waits for KV memory; needs "
            "--attention-backend batchllm, which runs their attention with the decode kernel "
            "(SGLang's --enable-mixed-chunk mixes every chunk).",
        ),
    )

    jobs_dir: str = field(
        default="",
        metadata=_setting(
            "Directory of the Files and Batches API's state (SQLite) and files; empty = "
            "~/.cache/sglang_batchllm/jobs (or $XDG_CACHE_HOME/sglang_batchllm/jobs). Never served over HTTP.",
            server=True,
        ),
    )
    max_upload_mb: int = field(
        default=200,
        metadata=_setting(
            "Largest file POST /v1/files accepts, in MiB; a bigger upload is refused with 413.",
            lo=1,
            server=True,
        ),
    )
    gather_ms: int = field(
        default=5,
        metadata=_setting(
            "Longest time, in ms, a group of requests that trickled in is held back so that more "
            "requests sharing its prefix can gather before it is computed; never applied to a "
            "request that shares nothing, never longer than computing the prefix takes (0 = off).",
            lo=0,
            hi=1000,
        ),
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("str", str):
                if not isinstance(value, str):
                    raise ConfigError(f"BatchLLM setting {f.name!r} must be a string, got {value!r}")
                continue
            if f.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"BatchLLM setting {f.name!r} must be true or false, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"BatchLLM setting {f.name!r} must be an integer, got {value!r}")
            lo, hi = f.metadata["lo"], f.metadata["hi"]
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                bounds = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
                raise ConfigError(
                    f"BatchLLM setting {f.name!r} = {value} is out of range {bounds}; "
                    f"set {flag_name(f.name)} or {env_name(f.name)} to a value in range."
                )

    # ---- environment -------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "BatchLLMConfig":
        """Read every `SGLANG_BATCHLLM_*` variable; an unknown one is an error, not ignored."""
        environ = os.environ if environ is None else environ
        known = {env_name(f.name): f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in environ.items():
            if not key.startswith(ENV_PREFIX):
                continue
            f = known.get(key)
            if f is None:
                close = difflib.get_close_matches(key, list(known), n=1)
                hint = f" Did you mean {close[0]}?" if close else ""
                raise ConfigError(
                    f"Unknown BatchLLM environment variable {key}.{hint} "
                    f"Known: {', '.join(sorted(known))}."
                )
            values[f.name] = _parse(f, raw, source=key)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce this config in another process."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[env_name(f.name)] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return out

    @contextlib.contextmanager
    def exported(self, environ: MutableMapping[str, str] | None = None) -> Iterator[None]:
        """Put this config in the environment for the duration (while children are spawned),
        then restore what was there, so a later plain `sglang.Engine` in the same process
        does not inherit BatchLLM."""
        environ = os.environ if environ is None else environ
        saved = {k: environ.get(k) for k in self.to_env()}
        environ.update(self.to_env())
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    environ.pop(k, None)
                else:
                    environ[k] = v

    def replace(self, **changes: Any) -> "BatchLLMConfig":
        return dataclasses.replace(self, **changes)


def is_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Only the master switch, read without validating the rest: a disabled plugin must not
    fail (or do anything at all) because of some other BatchLLM variable.

    Unset or empty is off. A value that is neither on nor off (`maybe`) raises `ConfigError`:
    someone set the switch meaning something, and guessing "off" would silently run plain
    SGLang (the plugin's `register()` turns it into a SystemExit)."""
    environ = os.environ if environ is None else environ
    key = env_name("enable")
    raw = environ.get(key)
    if raw is None:
        return False
    try:
        return _parse(_FIELDS["enable"], raw, source=key)
    except ConfigError:
        raise ConfigError(
            f"{key}={raw!r} is neither on nor off: use 1/true/yes/on to turn BatchLLM on, "
            f"0/false/no/off (or unset {key}) to leave it off"
        ) from None


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return FLAG_PREFIX + field_name.replace("_", "-")


def cli_fields(*, server: bool = False) -> list[dataclasses.Field]:
    """Fields exposed as `--batchllm-*` flags (everything but the master switch); the HTTP
    server's own settings only with `server=True` (the launcher's flags)."""
    return [f for f in dataclasses.fields(BatchLLMConfig)
            if f.metadata["cli"] and (server or not f.metadata["server"])]


_FIELDS = {f.name: f for f in dataclasses.fields(BatchLLMConfig)}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse(f: dataclasses.Field, raw: str, *, source: str) -> Any:
    if f.type in ("str", str):
        return raw
    text = raw.strip().lower()
    if f.type in ("bool", bool):
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"{source}={raw!r}: expected one of 1/0/true/false/yes/no/on/off")
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{source}={raw!r}: expected an integer") from None
