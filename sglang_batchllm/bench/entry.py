"""What every benchmark command does around its work: the command to reproduce it, and a
SIGTERM (what `timeout` sends) turned into KeyboardInterrupt so child processes are stopped."""

from __future__ import annotations

import os
import shlex
import signal
import sys
from typing import Any, Callable, Sequence


def command_line(argv: Sequence[str], script: str) -> str:
    """`python <script> <argv>`, with the script as it was invoked when that was this one."""
    invoked = sys.argv[0] if sys.argv else ""
    name = os.path.basename(script)
    path = os.path.relpath(invoked) if invoked.endswith(name) else script
    return shlex.join(["python", path, *argv])


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_command(run: Callable[[], int], command: str, interrupted: str) -> int:
    """Run `run()`; input errors end with exit 2, Ctrl-C or SIGTERM with 130 and `interrupted`
    (what was kept, how to go on); both repeat the command."""
    print(f"Reproduce with: {command}", flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run()
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}\nReproduce with: {command}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}\nReproduce with: {command}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
