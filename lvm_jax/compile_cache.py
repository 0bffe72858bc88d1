"""XLA's persistent compilation cache for lvm-train: a resumed or repeated run loads its compiled steps.

A rerun of the same command (after a preemption, a SIGTERM, or to train further)
compiles exactly the programs the first run compiled. JAX can keep those
executables on disk (`jax_compilation_cache_dir`); lvm-train turns that on by
default in `WORKDIR/compile_cache/<machine>/`: on the 2-core CPU host the tiny
DINOv2 test run starts in 17-20 s instead of 43-46 s the second time.

Why a `<machine>` subdirectory: JAX's cache key names the platform ('cpu') but
not the CPU's instruction set, and XLA:CPU is reported to load an entry built
for another CPU with only a logged warning -- code built for AVX-512 cannot run
on an AVX2-only host. A workdir on a shared filesystem is read by many machines,
so each kind of machine (CPU model and flags, accelerator kinds) gets its own
directory. JAX's own settings win: if `JAX_COMPILATION_CACHE_DIR` (or
`jax_compilation_cache_dir`) is already set, that cache is used as it is.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import platform
from collections.abc import Iterator

import jax
from etils import epath

OFF = ("none", "off", "false", "0")


def machine_tag() -> str:
    """`<platform>-<12 hex>`: one name per kind of machine whose compiled code can be shared.

    The hash covers the machine architecture, the accelerator kinds and, on CPU,
    the CPU model and its instruction-set flags (JAX's own key adds the rest:
    versions, device assignment, compile options).
    """
    devices = jax.devices()
    parts = [platform.machine(), *sorted({d.device_kind for d in devices})]
    if devices[0].platform == "cpu":
        parts.append(_cpu_identity())
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
    return f"{devices[0].platform}-{digest}"


# x86 /proc/cpuinfo flags that say how the kernel or hypervisor runs the CPU (speculation mitigations,
# virtualisation, timer quirks), not which instructions it has: hosts of one machine type differ in them
# with kernel and microcode versions, and keying the cache on them made those hosts miss each other's
# entries. The instruction-set flags that XLA's code depends on all stay in the key.
_NOT_ISA_FLAGS = frozenset("""
    hypervisor md_clear flush_l1d arch_capabilities ibrs ibpb stibp ssbd spec_ctrl intel_stibp ibrs_enhanced
    virt_ssbd amd_ssbd amd_stibp amd_ibpb pti kaiser retpoline retpoline_amd ibpb_brtype ibt user_shstk
    tsc_known_freq tsc_reliable constant_tsc nonstop_tsc nonstop_tsc_s3 tsc_adjust tsc_deadline_timer
    rep_good nopl xtopology cpuid cpuid_fault tpr_shadow flexpriority ept vpid ept_ad vnmi
    """.split())


def _cpu_identity(cpuinfo: str | None = None) -> str:
    """The first CPU's model name and instruction-set flags from /proc/cpuinfo (or `cpuinfo`, its
    text); `platform.processor()` where there is none."""
    if cpuinfo is None:
        try:
            cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor()
    first = cpuinfo.split("\n\n", 1)[0]
    keep = ("model name", "flags", "Features", "CPU implementer", "CPU part")  # x86 and arm64 spellings
    lines = []
    for line in first.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            value = " ".join(sorted(f for f in value.split() if f not in _NOT_ISA_FLAGS
                                    and not f.startswith(("vmx", "svm"))))
        if key.strip() in keep:
            lines.append(f"{key.strip()}: {value.strip()}")
    return "\n".join(lines) or platform.processor()


@contextlib.contextmanager
def use(setting: str, workdir: str | os.PathLike) -> Iterator[epath.Path | None]:
    """Turns on JAX's persistent compilation cache inside the block; yields the directory used.

    `setting` is `config.compile_cache_dir`: "" puts the cache in
    `workdir/compile_cache/<machine_tag()>`, a path (or gs:// URL, as JAX allows) puts it in
    `path/<machine_tag()>`,
    and "none" leaves it off (yields None). A cache directory already set through
    JAX's own flag or environment variable is kept (and yielded). On exit the
    previous setting is back, so a library user's later compilations are not
    written into this run's workdir. Enter before the compilations to be cached.
    """
    previous = jax.config.jax_compilation_cache_dir
    if previous or str(setting).strip().lower() in OFF:
        yield epath.Path(previous) if previous else None
        return
    from jax.experimental.compilation_cache import compilation_cache

    base = epath.Path(setting) if setting else epath.Path(workdir) / "compile_cache"
    directory = base / machine_tag()
    directory.mkdir(parents=True, exist_ok=True)
    # JAX decides once per process whether the cache is on (at its first compile):
    # the resets make a directory set after earlier compilations take effect, and undo it.
    jax.config.update("jax_compilation_cache_dir", str(directory))
    compilation_cache.reset_cache()
    try:
        yield directory
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
        compilation_cache.reset_cache()


_counts = {"/jax/compilation_cache/compile_requests_use_cache": 0, "/jax/compilation_cache/cache_hits": 0}
_listening = False


def _count(event: str, **_: object) -> None:
    if event in _counts:
        _counts[event] += 1


def start_counting() -> None:
    """Counts, from now on, the compilations that asked the cache and those it answered."""
    global _listening
    if not _listening:
        jax.monitoring.register_event_listener(_count)
        _listening = True
    for k in _counts:
        _counts[k] = 0


def summary(directory: epath.Path | None) -> str:
    """One line for the run's log, e.g. 'compile cache W/compile_cache/cpu-..: 4 of 6 programs loaded'."""
    if directory is None:
        return "compile cache: off (config.compile_cache_dir='none')"
    asked = _counts["/jax/compilation_cache/compile_requests_use_cache"]
    hits = _counts["/jax/compilation_cache/cache_hits"]
    least = jax.config.jax_persistent_cache_min_compile_time_secs
    return (f"compile cache {directory}: {hits} of {asked} programs loaded from it (JAX stores those that "
            f"take >= {least:g} s to compile)")
