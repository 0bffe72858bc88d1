"""`lvm-train --config configs/vit_synthetic.py --workdir W [--config.a.b=value ...]`."""

from __future__ import annotations

import argparse
import sys

from lvm_jax.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    from lvm_jax.config import load_config, split_config_args

    spec, overrides, rest = split_config_args(argv)
    parser = argparse.ArgumentParser(
        prog="lvm-train", description="Train a ViT / CLIP / DINOv2 model from a config file.",
        epilog="Override any config field with --config.FIELD=VALUE, e.g. --config.optim.lr=1e-3.")
    parser.add_argument("--workdir", required=True, help="Output dir; rerunning the same command resumes.")
    args = parser.parse_args(rest)
    if spec is None:
        parser.error("--config is required, e.g. --config configs/vit_synthetic.py")
    config = load_config(spec, overrides)

    from lvm_jax.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    from train.loop import train_and_evaluate

    metrics = train_and_evaluate(config, args.workdir)
    import jax

    if jax.process_index() == 0 and metrics:
        print("final " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
