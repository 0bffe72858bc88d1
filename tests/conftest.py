"""Shared pytest setup: 8 simulated CPU devices, set before jax is imported."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs reads this once, at import: with it on, every bucket access first asks GCS's gRPC control
# API for the bucket type, which the tests' local GCS emulator does not serve (a 60 s timeout).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
