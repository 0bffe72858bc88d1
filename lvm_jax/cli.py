"""Shared command-line plumbing: user mistakes print one line, not a traceback."""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Callable

from lvm_jax.errors import PREEMPTED_EXIT_CODE, Preempted, UserError

_OUR_PACKAGES = (str(pathlib.Path(__file__).resolve().parent), str(pathlib.Path(__file__).resolve().parents[1] / "train"))


def _raised_by_us(error: BaseException) -> bool:
    """A UserError, or a ValueError/FileNotFoundError raised deliberately by lvm_jax code.

    Errors from deep inside JAX/XLA keep their traceback: those are bugs, not user mistakes.
    """
    if isinstance(error, UserError):
        return True
    if "jax" in type(error.__cause__).__module__ or "For simplicity, JAX" in str(error):
        return False  # JAX filtered its own frames out of this traceback
    tb = error.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and str(pathlib.Path(last).resolve()).startswith(_OUR_PACKAGES)


def run_cli(fn: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Runs `fn(argv)`; a `UserError` (or a missing file) prints `error: ...` and exits 2.

    A `Preempted` run (SIGTERM, checkpoint saved) prints where it stopped and exits 143.

    Set LVM_DEBUG=1 to get the full traceback instead. The host allocator is set
    first (lvm_jax/host_memory.py: $LVM_JAX_HOST_MALLOC, default 'retain').
    """
    from lvm_jax.host_memory import configure_host_allocator

    argv = sys.argv[1:] if argv is None else argv
    try:
        configure_host_allocator()
        return int(fn(argv) or 0)
    except (UserError, FileNotFoundError, ValueError) as e:
        if os.environ.get("LVM_DEBUG") or not _raised_by_us(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
