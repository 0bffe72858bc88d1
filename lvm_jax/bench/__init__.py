"""`lvm-bench`: JIT-compiled step benchmarks (img/s, step time, compile time, TFLOP/s, MFU, memory),
side by side with PyTorch (timm / open_clip). Entry point: `lvm_jax.bench:main`; see `lvm_jax.bench.cli`."""
from lvm_jax.bench.cli import main

__all__ = ["main"]
