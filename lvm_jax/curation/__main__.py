"""``lvm-curate``: DINOv2-style data curation.

    lvm-curate embed --config configs/curate_synthetic.py --set pool --out DIR/emb/pool
    lvm-curate embeddings --curated A.npy --pool B.npy --out DIR [--reference R.npy ...]
                          [--dedup-threshold 0.6] [--k 4] [--mode sample|cluster|hierarchical]
    lvm-curate run --config configs/curate_synthetic.py [--out DIR] [--config.curation.retrieval.k=8]

``embed`` writes float16 embedding shards (resumable); ``embeddings`` deduplicates
and retrieves on embeddings (.npy files, rows are ids, or embedding
directories); ``run`` does both from a config: images -> embeddings -> dedup
-> retrieval -> manifest (a training source: ``--config.data.source=manifest
--config.data.path=DIR``).

Several processes (``jax.distributed``): pass ``--coordinator HOST:PORT
--num-processes P --process-id I`` (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) on every host; embedding and pool search are
sharded by process, outputs are written by process 0.

``--out`` may be a gs:// or s3:// URL: the work happens in a local mirror (``--stage``) that
uploads as results land and resumes from the bucket (``lvm_jax.curation.staging``).
"""

from __future__ import annotations

import argparse
import os
import sys

from lvm_jax.cli import run_cli
from lvm_jax.errors import UserError
from lvm_jax.workdir import is_remote


def _distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes (jax.distributed)")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)


def _init_distributed(args) -> "Comm":
    """Initialises jax.distributed when asked (flags or env); returns the process group."""
    from lvm_jax.curation.index import Comm
    if args.coordinator:
        os.environ["JAX_COORDINATOR_ADDRESS"] = args.coordinator
        os.environ["JAX_NUM_PROCESSES"] = str(args.num_processes or 1)
        os.environ["JAX_PROCESS_ID"] = str(args.process_id or 0)
    if not os.environ.get("JAX_COORDINATOR_ADDRESS") and not args.coordinator:
        return Comm()
    from lvm_jax.sharding import maybe_initialize_distributed
    maybe_initialize_distributed()
    return Comm.from_jax()


def _levels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--levels takes comma-separated ints, got {text!r}") from e


def _embeddings_parser(sub) -> None:
    p = sub.add_parser("embeddings", help="dedup + retrieval on embeddings (.npy or embedding dirs)")
    p.add_argument("--curated", required=True, help="curated embeddings: .npy [N, D] or embedding dir")
    p.add_argument("--pool", required=True, help="uncurated pool embeddings: .npy or embedding dir")
    p.add_argument("--out", required=True, help="output directory or gs:// / s3:// URL")
    from lvm_jax.curation.embed import add_stage_arg
    add_stage_arg(p)
    p.add_argument("--reference", action="append", default=[],
                   help="reference set (e.g. an eval set) for relative dedup; repeatable")
    g = p.add_argument_group("deduplication")
    g.add_argument("--dedup-threshold", type=float, default=0.6)
    g.add_argument("--reference-threshold", type=float, default=0.45)
    g.add_argument("--dedup-k", type=int, default=64)
    g.add_argument("--no-dedup", action="store_true", help="skip self-deduplication")
    g = p.add_argument_group("retrieval")
    g.add_argument("--k", type=int, default=4, help="pool neighbours per curated image")
    g.add_argument("--mode", default="sample", choices=("sample", "cluster", "hierarchical"))
    g.add_argument("--num-clusters", type=int, default=0, help="cluster mode; 0 = sqrt(pool)")
    g.add_argument("--per-cluster", type=int, default=0, help="cluster mode; 0 = k x queries in it")
    g.add_argument("--levels", type=_levels, default=(), help="hierarchical: e.g. 1000,100,10")
    g.add_argument("--target-size", type=int, default=0, help="hierarchical; 0 = k x curated")
    g.add_argument("--all-clusters", action="store_true",
                   help="hierarchical: sample the whole pool, not only clusters holding queries")
    g.add_argument("--seed", type=int, default=0)
    p.add_argument("--center", action="store_true",
                   help="subtract the pool's mean vector before cosine (anisotropic embeddings)")
    from lvm_jax.curation.index import IndexConfig
    d = IndexConfig()
    g = p.add_argument_group("index")
    g.add_argument("--index", default=d.kind, choices=("auto", "flat", "ivf"))
    g.add_argument("--exact-max", type=int, default=d.exact_max, help="auto: exact search up to this pool size")
    g.add_argument("--nlist", type=int, default=d.nlist, help="IVF lists; 0 = auto")
    g.add_argument("--nprobe", type=int, default=d.nprobe, help="IVF lists probed per query (recall/speed)")
    g.add_argument("--target-recall", type=float, default=d.target_recall,
                   help="raise nprobe until retrieval recall@k vs exact search reaches this (0: off)")
    g.add_argument("--dedup-nprobe", type=int, default=d.dedup_nprobe,
                   help="IVF lists probed per pool vector in self-dedup")
    g.add_argument("--reference-nprobe", type=int, default=d.reference_nprobe,
                   help="IVF lists probed per reference vector in relative dedup")
    g.add_argument("--recall-sample", type=int, default=256,
                   help="curated queries checked against exact search to tune nprobe (0: skip)")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    _distributed_args(p)


def embeddings_config(args) -> dict:
    return dict(
        dedup=dict(enabled=not args.no_dedup, threshold=args.dedup_threshold, k=args.dedup_k,
                   reference_threshold=args.reference_threshold),
        retrieval=dict(mode=args.mode, k=args.k, num_clusters=args.num_clusters,
                       per_cluster=args.per_cluster, levels=tuple(args.levels),
                       target_size=args.target_size, queries_only=not args.all_clusters, seed=args.seed),
        index=dict(kind=args.index, exact_max=args.exact_max, nlist=args.nlist, nprobe=args.nprobe,
                   target_recall=args.target_recall, dedup_nprobe=args.dedup_nprobe,
                   reference_nprobe=args.reference_nprobe, seed=args.seed),
        center=args.center,
        recall_sample=args.recall_sample,
        report=dict(enabled=not args.no_report),
    )


def cmd_embeddings(args) -> int:
    from lvm_jax.curation import pipeline
    from lvm_jax.curation.index import load_vectors
    from lvm_jax.curation.staging import local_input, open_mirror
    comm = _init_distributed(args)
    progress = not args.no_progress
    mirror = open_mirror(args.out, args.stage, "--out", progress=progress)
    # Inputs in a bucket are downloaded (they are memory-mapped) -- those under --out are in its
    # mirror already; summary.json records where they live, so the manifest source follows them
    # back to the bucket.
    named = [("curated", args.curated, "--curated"), ("pool", args.pool, "--pool")]
    named += [(None, r, "--reference") for r in args.reference]
    local = [local_input(path, flag, progress, within=mirror) for _, path, flag in named]
    curated, pool, *refs = [load_vectors(p, name) for (name, _, _), p in zip(named, local)]
    recorded = [p if is_remote(p) else os.path.abspath(p) for _, p, _ in named]
    inputs = dict(curated=recorded[0], pool=recorded[1], references=recorded[2:])
    image_fn = _image_fn_for(dict(curated=local[0], pool=local[1]))
    summary = pipeline.curate(curated, pool, mirror.local, refs, embeddings_config(args), comm,
                              progress=progress, inputs=inputs, image_fn=image_fn)
    if comm.rank == 0:
        mirror.push()
        _print_summary(summary, mirror.location())
    return 0


def _image_fn_for(inputs: dict):
    """Image loader for the report when the embedding dirs record their sources; else None."""
    try:
        from lvm_jax.data.manifest import open_embedded_source
        sources = {k: open_embedded_source(inputs[k]) for k in ("curated", "pool")}
    except Exception:  # no recorded source (plain .npy): the report lists ids instead
        return None
    if any(s is None for s in sources.values()):
        return None
    from lvm_jax.data.transforms import decode_image

    def image_fn(which: str, row: int):
        src, ids = sources[which]
        return decode_image(src[int(ids[row])]["image"])

    return image_fn


def _print_summary(summary: dict, out: str) -> None:
    c, t = summary["counts"], summary["timings_s"]
    recall = summary.get("recall_at_k_estimate")
    print(f"curated {c['curated']}, pool {c['pool']}: removed {c['removed_self']} self-duplicates and "
          f"{c['removed_reference']} reference matches, retrieved {c['retrieved']} -> "
          f"{c['manifest']} images in {os.path.join(out, 'manifest.jsonl')} "
          f"({t['total']:.1f} s" + (f", recall@k ~{recall:.3f}" if recall is not None else "") + ")")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lvm-curate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    _embeddings_parser(sub)
    from lvm_jax.curation import embed
    embed.add_embed_parser(sub, _distributed_args)
    embed.add_run_parser(sub, _distributed_args)
    return p


def _main(argv: list[str]) -> int:
    from lvm_jax.config import split_config_args
    spec, overrides, rest = split_config_args(argv)
    args = build_parser().parse_args(rest)
    args.config, args.overrides = spec, overrides
    if args.command == "embeddings":
        if spec or overrides:
            raise UserError("`lvm-curate embeddings` takes flags, not --config; see --help.")
        return cmd_embeddings(args)
    from lvm_jax.curation import embed
    return embed.cmd_embed(args, _init_distributed) if args.command == "embed" else \
        embed.cmd_run(args, _init_distributed)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
