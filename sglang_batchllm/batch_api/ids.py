"""Opaque object ids. An id is only ever a key into the SQLite store, never part of a path: the
files behind it are named by the store (`store.new_storage_name`), so no id, however crafted,
can reach outside the jobs directory. Ids that do not have our shape are refused before any
lookup."""

from __future__ import annotations

import re
import secrets

FILE_PREFIX = "file-"
BATCH_PREFIX = "batch_"
_HEX = 24  # 96 random bits: unguessable, and short enough to read in a log

_SHAPE = {prefix: re.compile(re.escape(prefix) + f"[0-9a-f]{{{_HEX}}}") for prefix in (FILE_PREFIX, BATCH_PREFIX)}


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(_HEX // 2)


def is_id(prefix: str, value: str) -> bool:
    return isinstance(value, str) and _SHAPE[prefix].fullmatch(value) is not None
