"""Shared command-line plumbing: user mistakes print one line, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from lvm_jax.errors import UserError


def run_cli(fn: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Runs `fn(argv)`; a `UserError` (or a missing file) prints `error: ...` and exits 2.

    Set LVM_DEBUG=1 to get the full traceback instead.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        return int(fn(argv) or 0)
    except (UserError, FileNotFoundError) as e:
        if os.environ.get("LVM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
