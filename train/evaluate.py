"""`lvm-eval --config CONFIG --workdir W [--step N]`: evaluate a checkpoint with the task's evals."""

from __future__ import annotations

import argparse
import sys

from lvm_jax.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    from lvm_jax.config import load_config, split_config_args

    spec, overrides, rest = split_config_args(argv)
    parser = argparse.ArgumentParser(prog="lvm-eval", description="Evaluate the latest checkpoint of a run.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = parser.parse_args(rest)
    if spec is None:
        parser.error("--config is required (the config the run was trained with)")
    config = load_config(spec, overrides)
    from lvm_jax.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    from train.loop import evaluate_checkpoint

    metrics = evaluate_checkpoint(config, args.workdir, args.step)
    print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
