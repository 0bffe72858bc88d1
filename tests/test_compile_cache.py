"""lvm-train's XLA compile cache: one directory per kind of machine, scoped to the run, and a rerun loads
what the first run compiled (the resume tests check that loaded steps give bitwise the same training)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax import compile_cache


@pytest.fixture
def store_everything():
    """JAX stores only programs that take >= 1 s to compile; these test programs take milliseconds."""
    old = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old)


def _program(x):
    return jnp.tanh(x @ x.T).sum(axis=0) * 3.0


def test_machines_with_other_cpu_flags_get_other_directories(monkeypatch):
    monkeypatch.setattr(compile_cache, "_cpu_identity", lambda: "model name : X\nflags : fpu sse2 avx2 fma")
    avx2 = compile_cache.machine_tag()
    monkeypatch.setattr(compile_cache, "_cpu_identity", lambda: "model name : X\nflags : fpu sse2 avx2 fma avx512f")
    avx512 = compile_cache.machine_tag()
    assert avx2 != avx512 and avx2.startswith("cpu-") and len(avx2) == len("cpu-") + 12
    assert compile_cache.machine_tag() == avx512  # stable for one machine


def test_hosts_that_differ_only_in_mitigation_and_hypervisor_flags_share_a_directory():
    def cpuinfo(flags):
        return (f"processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: {flags}\nbugs\t\t: sysret_ss_attrs\n\n"
                "processor\t: 1\n")

    base = "fpu sse2 ssse3 avx avx2 fma bmi2 adx"
    # One machine type under two kernels/microcodes/hypervisors: the ISA is the same.
    same = {compile_cache._cpu_identity(cpuinfo(base + extra))
            for extra in ("", " hypervisor md_clear ibpb ssbd", " constant_tsc rep_good nopl arch_capabilities")}
    assert len(same) == 1 and "avx2" in same.pop()
    assert compile_cache._cpu_identity(cpuinfo(base)) != compile_cache._cpu_identity(cpuinfo(base + " avx512f"))
    assert (compile_cache._cpu_identity(cpuinfo(base)) !=
            compile_cache._cpu_identity(cpuinfo(base).replace("7B13", "7B12")))  # LLVM tunes for the model


def test_the_real_cpu_identity_names_the_instruction_set():
    identity = compile_cache._cpu_identity()
    assert identity
    with open("/proc/cpuinfo") as f:
        if "flags" in f.read():
            assert "flags" in identity


def test_a_second_run_loads_what_the_first_compiled_and_the_setting_is_undone(tmp_path, store_everything):
    x = jnp.arange(12.0).reshape(3, 4)
    with compile_cache.use("", tmp_path) as directory:
        assert directory == tmp_path / "compile_cache" / compile_cache.machine_tag()
        assert jax.config.jax_compilation_cache_dir == str(directory)
        compile_cache.start_counting()
        first = jax.jit(_program)(x)
        assert "0 of 1 programs loaded" in compile_cache.summary(directory)
    assert jax.config.jax_compilation_cache_dir is None  # a library user's later programs go elsewhere
    assert any(directory.iterdir())

    with compile_cache.use("", tmp_path) as again:
        compile_cache.start_counting()
        jax.clear_caches()  # not from memory
        second = jax.jit(_program)(x)
        assert "1 of 1 programs loaded" in compile_cache.summary(again), compile_cache.summary(again)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


def test_none_turns_it_off_and_a_directory_set_through_jax_wins(tmp_path):
    with compile_cache.use("none", tmp_path) as directory:
        assert directory is None and jax.config.jax_compilation_cache_dir is None
        assert "off" in compile_cache.summary(directory)
    assert not (tmp_path / "compile_cache").exists()

    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "users"))
    try:
        with compile_cache.use("", tmp_path / "run") as directory:
            assert directory == tmp_path / "users"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "users")
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
