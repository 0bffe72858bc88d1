"""Host allocator setting that stops XLA:CPU from re-faulting its large buffers on every step.

XLA:CPU allocates each step's outputs and temporaries with the C library's
`malloc`. glibc serves every block above its mmap threshold (at most 32 MiB)
with a fresh `mmap` and gives it back with `munmap` when it is freed, and it
trims the heap's free top back to the OS: so a step whose activations are tens
of MB per buffer pays a page fault and a kernel zero-fill for every 4 KiB of
them, every step. On the 2-core CPU machine that made the ViT-S/16 MLP's
`[6304, 384] x [384, 1536]` forward dot (a 38.7 MB output) take 25-27 ms
instead of 15 ms -- the "cliff above 1152 output columns" of earlier notes --
and the whole f32 b32 training step 3442 -> 3147-3161 ms (docs/benchmarks.md).

`configure_host_allocator('retain')` tells glibc (mallopt) to serve large
blocks from the heap and keep freed memory for reuse: the next step's buffers
land on pages that are already mapped. Three settings, each needed:
  M_MMAP_MAX=0         no block gets its own mmap (and munmap on free);
  M_TRIM_THRESHOLD=-1  the heap's free top is never given back (any finite
                       threshold fits in an int, <= 2 GiB, and a ViT-S/16 b32
                       step frees ~2.8 GB of temporaries at once: trimmed and
                       re-faulted every step, 3-4 s of kernel time per 13 s step
                       on a 2-core AVX2 host, session 10);
  M_ARENA_MAX=1        every thread allocates from the main heap: XLA runs the
                       step on its own threads, and a thread arena's heaps are at
                       most 64 MiB, so glibc mmaps a larger block for it whatever
                       M_MMAP_MAX says.
The cost is that the process keeps its peak heap instead of returning it to the
OS between steps (the RSS peak barely moves: 6.84 -> 7.08 GB for the step above),
and threads share one malloc lock (XLA's allocations are few and large). The
setting is process-wide, so the library never applies it on import; the command-line tools (lvm-train,
lvm-eval, lvm-bench, lvm-curate, lvm-convert) apply it at start, and
`LVM_JAX_HOST_MALLOC=system` turns it off. On other C libraries (musl, macOS) it is a no-op that says so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "LVM_JAX_HOST_MALLOC"
MODES = ("retain", "system")

# glibc <malloc.h> mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"

_applied: str | None = None  # what the last call did (reported by lvm-bench)


def _glibc() -> ctypes.CDLL | None:
  """The process's C library when it is glibc (has mallopt and gnu_get_libc_version), else None."""
  name = ctypes.util.find_library("c")
  if not name:
    return None
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
  except (OSError, AttributeError):
    return None
  return libc


def configure_host_allocator(mode: str | None = None) -> str:
  """Applies host allocator `mode` to this process and returns a one-line description of what was done.

  mode: 'retain' (large blocks from the heap, freed memory kept for reuse) or
  'system' (leave the C library's defaults); None reads $LVM_JAX_HOST_MALLOC,
  default 'retain'. Call it early, before the first large allocation and
  before jax starts its threads (a thread keeps the arena it started with); the
  setting lasts for the rest of the process ('system' after 'retain' does
  not undo it).
  """
  global _applied
  if mode is None:
    mode = os.environ.get(ENV, "").strip() or "retain"
  if mode not in MODES:
    raise ValueError(f"{ENV}={mode!r} is not a valid host allocator mode; set it to one of {MODES} or unset it.")
  if mode == "system":
    _applied = "system: C library defaults"
    return _applied
  preloaded = _preloaded_allocator()
  if preloaded:
    # glibc's mallopt still answers, but malloc is the preloaded one's: the settings would do nothing.
    _applied = f"system: LD_PRELOAD replaces malloc with {preloaded}, so 'retain' does not apply"
    return _applied
  libc = _glibc()
  if libc is None:
    _applied = "system: not glibc, so 'retain' does not apply"
    return _applied
  settings = {"M_MMAP_MAX=0": (_M_MMAP_MAX, 0), "M_TRIM_THRESHOLD=-1": (_M_TRIM_THRESHOLD, _NEVER_TRIM),
              "M_ARENA_MAX=1": (_M_ARENA_MAX, 1)}
  # Every setting is tried (not all(...), which stopped at the first refusal): each one helps by itself.
  accepted = [name for name, (param, value) in settings.items() if libc.mallopt(param, value) == 1]
  refused = [name for name in settings if name not in accepted]
  version = libc.gnu_get_libc_version().decode()
  if not accepted:
    _applied = f"system: glibc {version} refused mallopt"
  else:
    _applied = f"retain: glibc {version} mallopt({', '.join(accepted)})" + (
        f"; refused {', '.join(refused)}" if refused else "")
  return _applied


_REPLACEMENT_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc", "hoard", "snmalloc")


def _preloaded_allocator() -> str | None:
  """The malloc replacement named in $LD_PRELOAD (tcmalloc, jemalloc, ...), or None."""
  for entry in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
    base = os.path.basename(entry)
    if any(name in base for name in _REPLACEMENT_ALLOCATORS):
      return base
  return None


def applied() -> str | None:
  """What the last `configure_host_allocator` call did in this process, or None if it was never called."""
  return _applied
