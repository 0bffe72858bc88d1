"""lvm_jax.host_memory: the glibc allocator setting the command-line tools apply at start."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lvm_jax import host_memory

# The probes run in a fresh interpreter (the setting is process-wide and one-way). The prelude applies
# MODE (argv[1]) and sets up libc's malloc, free and mallinfo2 through ctypes.
_PRELUDE = """
import ctypes, json, sys, threading
from lvm_jax import host_memory
done = host_memory.configure_host_allocator(sys.argv[1])
libc = ctypes.CDLL("libc.so.6")
class Mallinfo2(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                             "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
"""

# Mallocs a 64 MiB block and reports how many bytes glibc holds in mmap'd blocks while it is live.
_PROBE = _PRELUDE + """
before = libc.mallinfo2().hblkhd
block = libc.malloc(64 << 20)
during = libc.mallinfo2().hblkhd
libc.free(block)
print(json.dumps({"done": done, "mmapped_growth": during - before}))
"""


def _glibc_with_mallinfo2() -> bool:
  libc = host_memory._glibc()
  return libc is not None and hasattr(libc, "mallinfo2")


def _probe(mode: str, script: str = _PROBE) -> dict:
  out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallopt, mallinfo2)")
def test_retain_serves_large_blocks_from_the_heap_and_system_does_not():
  system = _probe("system")
  assert system["done"].startswith("system")
  assert system["mmapped_growth"] >= 64 << 20, system  # glibc's default: a 64 MiB block is its own mmap
  retain = _probe("retain")
  assert retain["done"].startswith("retain: glibc"), retain
  assert retain["mmapped_growth"] == 0, retain  # from the heap: its pages stay mapped after free


def test_bad_mode_is_one_clear_sentence(monkeypatch):
  monkeypatch.setenv(host_memory.ENV, "mmap")
  with pytest.raises(ValueError, match=r"LVM_JAX_HOST_MALLOC='mmap' is not a valid host allocator mode; set it"):
    host_memory.configure_host_allocator()


def test_env_selects_the_mode_and_applied_reports_it(monkeypatch):
  monkeypatch.setenv(host_memory.ENV, "system")
  assert host_memory.configure_host_allocator() == "system: C library defaults"
  assert host_memory.applied() == "system: C library defaults"


def test_command_line_tools_apply_it_and_report_a_bad_value(monkeypatch, capsys):
  from lvm_jax.cli import run_cli

  monkeypatch.setenv(host_memory.ENV, "system")
  assert run_cli(lambda argv: 0 if host_memory.applied().startswith("system") else 1, []) == 0
  monkeypatch.setenv(host_memory.ENV, "bogus")
  assert run_cli(lambda argv: 0, []) == 2
  assert "LVM_JAX_HOST_MALLOC='bogus' is not a valid host allocator mode" in capsys.readouterr().err


# A 64 MiB block malloc'd by a new (non-main) thread, as XLA's step threads do, then a 2.5 GiB block on
# the main thread freed at once (a ViT-S/16 b32 step frees ~2.8 GB of temporaries): reports the thread
# block's mmap'd bytes and how much heap glibc still holds after the big free.
_THREAD_AND_TRIM_PROBE = _PRELUDE + """
seen = {}
def in_thread():
  before = libc.mallinfo2().hblkhd
  block = libc.malloc(64 << 20)
  seen["thread_mmapped"] = libc.mallinfo2().hblkhd - before
  libc.free(block)
t = threading.Thread(target=in_thread); t.start(); t.join()
big = libc.malloc(5 << 29)  # 2.5 GiB of address space; its pages are never touched
libc.free(big)
print(json.dumps({"done": done, "thread_mmapped": seen["thread_mmapped"], "heap_after_free": libc.mallinfo2().arena}))
"""


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallopt, mallinfo2)")
def test_retain_covers_other_threads_and_never_trims_a_multi_gigabyte_free():
  system = _probe("system", _THREAD_AND_TRIM_PROBE)
  assert system["thread_mmapped"] >= 64 << 20, system  # glibc's default: its own mmap
  assert system["heap_after_free"] < 1 << 30, system  # the 2.5 GiB block was an mmap, unmapped on free
  retain = _probe("retain", _THREAD_AND_TRIM_PROBE)
  assert retain["done"].endswith("M_ARENA_MAX=1)"), retain
  # M_ARENA_MAX=1: the thread allocates from the main heap (a thread arena would have mmap'd 64 MiB).
  assert retain["thread_mmapped"] == 0, retain
  # M_TRIM_THRESHOLD=-1: the freed 2.5 GiB stays in the heap (2^31-1, the largest finite threshold, trims it).
  assert retain["heap_after_free"] >= 5 << 29, retain


class _FakeGlibc:
  """mallopt refuses the parameters in `refuse` and records every call."""

  def __init__(self, refuse: set[int]):
    self.refuse, self.calls = refuse, []

  def mallopt(self, param: int, value: int) -> int:
    self.calls.append(param)
    return 0 if param in self.refuse else 1

  def gnu_get_libc_version(self) -> bytes:
    return b"2.99"


def test_every_setting_is_tried_and_a_refusal_is_named(monkeypatch):
  # The first one refused used to stop the rest (all(...) short-circuits) and report "system".
  fake = _FakeGlibc(refuse={host_memory._M_MMAP_MAX})
  monkeypatch.setattr(host_memory, "_glibc", lambda: fake)
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  done = host_memory.configure_host_allocator("retain")
  assert sorted(fake.calls) == sorted([host_memory._M_MMAP_MAX, host_memory._M_TRIM_THRESHOLD,
                                       host_memory._M_ARENA_MAX])
  assert done == "retain: glibc 2.99 mallopt(M_TRIM_THRESHOLD=-1, M_ARENA_MAX=1); refused M_MMAP_MAX=0"
  fake = _FakeGlibc(refuse={host_memory._M_MMAP_MAX, host_memory._M_TRIM_THRESHOLD, host_memory._M_ARENA_MAX})
  monkeypatch.setattr(host_memory, "_glibc", lambda: fake)
  assert host_memory.configure_host_allocator("retain") == "system: glibc 2.99 refused mallopt"


def test_a_preloaded_malloc_is_reported_not_configured(monkeypatch):
  # glibc's mallopt still returns 1 under tcmalloc, so this reported "retain: glibc" for settings that do nothing.
  fake = _FakeGlibc(refuse=set())
  monkeypatch.setattr(host_memory, "_glibc", lambda: fake)
  monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
  assert host_memory.configure_host_allocator("retain") == (
      "system: LD_PRELOAD replaces malloc with libtcmalloc_minimal.so.4, so 'retain' does not apply")
  assert fake.calls == []
