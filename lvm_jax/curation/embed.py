"""Embedding images with a project backbone, and the ``embed`` / ``run`` commands.

The forward is one jitted function over a mesh of this process's devices: a
batch is split over the devices on its leading axis (``P(('data', 'fsdp'))``),
the params are replicated, and the output rows are L2-normalised float32,
stored as float16.  Embedding is embarrassingly parallel, so each process uses
only its *local* devices: a global mesh would make processes step in lockstep
even where a resumed run leaves them different amounts of work.

Across processes (``jax.distributed``) the source is cut into shards of
``shard_size`` records; process p embeds shards p, p + P, p + 2P, ...  A shard
is written as ids/labels/paths first and ``emb_XXXXX.npy`` last (renamed into
place), so an existing ``emb`` file means the shard is complete and a re-run
skips it.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from lvm_jax.curation.index import INDEX_FILE, Comm, shard_file
from lvm_jax.errors import UserError

FEATURES = ("auto", "cls", "pooled", "pre_logits", "patch_mean")


# ----------------------------------------------------------------------------
# The sharded forward
# ----------------------------------------------------------------------------
class Embedder:
    """Normalised embeddings ``[n, D]`` of float images ``[n, H, W, 3]`` with a jitted, sharded forward.

    Args:
      model: a flax module returning the ViT output dict (``'cls'``, ``'pooled'``, ...).
      params: its params (plain or logically boxed arrays).
      feature: which output to embed; 'auto' = 'cls' when the model has a class token,
        else 'pooled'; 'patch_mean' = mean of the patch tokens.
      batch_size: images per forward call on this process (a multiple of the local devices).
    """

    def __init__(self, model, params, feature: str = "auto", batch_size: int = 256, devices=None):
        import flax.linen as nn
        import jax
        import jax.numpy as jnp

        from lvm_jax import sharding

        if feature not in FEATURES:
            raise UserError(f"embed feature {feature!r} is not one of {FEATURES}.")
        devices = list(devices or jax.local_devices())
        self.mesh = sharding.make_mesh({"data": -1}, devices=devices)
        if batch_size % len(devices):
            raise UserError(f"embed batch_size={batch_size} is not divisible by the {len(devices)} local "
                            f"devices; use a multiple of {len(devices)}.")
        self.batch_size = batch_size
        self.in_sharding = sharding.batch_sharding(self.mesh)
        replicated = sharding.replicated(self.mesh)
        self.params = jax.device_put(nn.meta.unbox(params), replicated)

        def forward(params, images):
            out = model.apply({"params": params}, images, train=False)
            if feature == "patch_mean":
                x = out["patch_tokens"].mean(axis=1)
            elif feature == "auto":
                x = out["cls"] if out.get("cls") is not None else out["pooled"]
            else:
                x = out.get(feature)
                if x is None:
                    raise UserError(f"the model has no {feature!r} output; pick another embed feature.")
            x = x.astype(jnp.float32)
            return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

        with sharding.mesh_context(self.mesh):
            self._forward = jax.jit(forward, in_shardings=(replicated, self.in_sharding),
                                    out_shardings=self.in_sharding)
        self.calls = 0  # forward calls made (resume tests count them)

    def dim(self, image_size: int) -> int:
        import jax
        import jax.numpy as jnp
        shape = jax.eval_shape(self._forward, self.params,
                               jax.ShapeDtypeStruct((self.batch_size, image_size, image_size, 3), jnp.float32))
        return int(shape.shape[-1])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import jax

        from lvm_jax import sharding
        n = len(images)
        out = []
        with sharding.mesh_context(self.mesh):
            for s in range(0, n, self.batch_size):
                batch = images[s:s + self.batch_size]
                if len(batch) < self.batch_size:  # pad: one compiled shape for every call
                    pad = np.zeros((self.batch_size - len(batch),) + batch.shape[1:], batch.dtype)
                    batch = np.concatenate([batch, pad])
                emb = self._forward(self.params, jax.device_put(np.asarray(batch, np.float32),
                                                                self.in_sharding))
                self.calls += 1
                out.append(np.asarray(emb)[:min(self.batch_size, n - s)])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def make_preprocess(image_size: int, crop_pct: float = 0.875, mean=None, std=None,
                    interpolation: str = "bicubic") -> Callable[[dict], np.ndarray]:
    """record -> float32 ``[S, S, 3]``: decode, resize shorter side + centre crop, normalise."""
    from lvm_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, decode_image, normalize, \
        resize_center_crop
    mean, std = tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD)

    def preprocess(record: dict) -> np.ndarray:
        image = decode_image(record["image"])
        return normalize(resize_center_crop(image, image_size, crop_pct, interpolation), mean, std)

    return preprocess


# ----------------------------------------------------------------------------
# Embedding a source into shards
# ----------------------------------------------------------------------------
def _batches(source, indices: np.ndarray, batch_size: int, preprocess, pool: cf.Executor
             ) -> Iterator[tuple[np.ndarray, list[dict]]]:
    """(images, records) per batch; the next batch decodes while the current one runs."""
    def load(i):
        record = source[int(i)]
        return preprocess(record), {k: record[k] for k in ("label", "path") if k in record}

    starts = list(range(0, len(indices), batch_size))
    pending = pool.map(load, indices[starts[0]:starts[0] + batch_size]) if starts else None
    for j, s in enumerate(starts):
        done = list(pending)
        if j + 1 < len(starts):
            nxt = starts[j + 1]
            pending = pool.map(load, indices[nxt:nxt + batch_size])
        yield np.stack([d[0] for d in done]), [d[1] for d in done]


def _plan(source, shard_size: int, dim: int, spec: dict | None, model_desc: dict | None) -> dict:
    n = len(source)
    return dict(dim=dim, count=n, shard_size=shard_size, num_shards=math.ceil(n / shard_size),
                dtype="float16", normalized=True, source=spec, model=model_desc)


def embed_source(source, out_dir: str, embedder: Embedder, preprocess: Callable[[dict], np.ndarray],
                 image_size: int, shard_size: int = 4096, spec: dict | None = None,
                 model_desc: dict | None = None, comm: Comm | None = None, workers: int = 4,
                 progress: bool = True, after_shard: Callable[[list[str]], Any] | None = None) -> dict:
    """Embeds every record of `source` into `out_dir` (see module docstring); returns index.json.

    spec: how to rebuild the source (``lvm_jax.data.manifest.source_spec``), recorded so the
      manifest can be trained on and the report can show images.
    model_desc: what produced the embeddings; a re-run with a different one is refused.
    after_shard: called with the files of each shard this process wrote, the embedding file
      last (``lvm-curate --out gs://...`` uploads them right away).
    """
    comm = comm or Comm()
    if len(source) == 0:
        raise UserError(f"the source to embed into {out_dir!r} is empty; check its data config.")
    if shard_size < 1:
        raise UserError(f"embed shard_size must be >= 1, got {shard_size}.")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(source, shard_size, embedder.dim(image_size), spec, model_desc)
    meta_file = out / INDEX_FILE
    if meta_file.exists():
        old = json.loads(meta_file.read_text())
        changed = [k for k in ("dim", "count", "shard_size", "source", "model") if old.get(k) != plan[k]]
        if changed:
            raise UserError(f"{out_dir!r} holds embeddings made with a different {', '.join(changed)}; "
                            "use a new output directory (or delete this one) to re-embed.")
    elif comm.rank == 0:
        tmp = meta_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(plan, indent=2))
        os.replace(tmp, meta_file)

    mine = [s for s in range(plan["num_shards"])
            if s % comm.size == comm.rank and not (out / shard_file("emb", s)).exists()]
    total = sum(min(len(source), (s + 1) * shard_size) - s * shard_size for s in mine)
    bar = tqdm(total=total, desc=f"embed {out.name}", unit="img", disable=not progress or comm.rank != 0,
               dynamic_ncols=True, smoothing=0.1)
    with cf.ThreadPoolExecutor(max(1, workers)) as pool:
        for s in mine:
            indices = np.arange(s * shard_size, min(len(source), (s + 1) * shard_size))
            embs, labels, paths = [], [], []
            for images, records in _batches(source, indices, embedder.batch_size, preprocess, pool):
                embs.append(embedder(images))
                labels += [r.get("label") for r in records]
                paths += [r.get("path") for r in records]
                bar.update(len(images))
            written = _write_shard(out, s, indices, np.concatenate(embs), labels, paths)
            if after_shard is not None:
                after_shard(written)
    bar.close()
    if comm.size > 1:  # everyone's shards exist before anyone reads them
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"lvm-curate embed {out.name}")  # same on every host
    return plan


def _write_shard(out: pathlib.Path, s: int, ids: np.ndarray, emb: np.ndarray, labels: list, paths: list
                 ) -> list[str]:
    """Writes shard `s`; returns the files written, the embedding file (the shard's done mark) last."""
    written = [out / shard_file("ids", s)]
    np.save(written[-1], ids.astype(np.int64))
    if all(l is not None for l in labels):
        written.append(out / shard_file("labels", s))
        np.save(written[-1], np.asarray(labels, np.int64))
    if all(p is not None for p in paths):
        written.append(out / shard_file("paths", s, "json"))
        written[-1].write_text(json.dumps(paths))
    tmp = out / f"emb_{s:05d}.tmp{os.getpid()}.npy"
    np.save(tmp, emb.astype(np.float16))
    written.append(out / shard_file("emb", s))
    os.replace(tmp, written[-1])  # last: its existence marks the shard done
    return [str(w) for w in written]


# ----------------------------------------------------------------------------
# Backbones: random init, trained by lvm-train, or a params file
# ----------------------------------------------------------------------------
def _flat_to_tree(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        parts = key.replace(".", "/").split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = np.asarray(value)
    return tree


def _unwrap(tree: Any) -> Any:
    """Strips orbax/flax box dicts ({'value': array, 'names': ...}) left by a target-less restore."""
    if isinstance(tree, dict):
        if "value" in tree and set(tree) <= {"value", "names", "mesh", "rules"}:
            return _unwrap(tree["value"])
        return {k: _unwrap(v) for k, v in tree.items()}
    return tree


def read_params(path: str) -> dict:
    """Params tree from an lvm-train workdir (latest checkpoint), an orbax step dir, or a
    flat ``.npz`` / ``.safetensors`` file ('a/b/c' keys)."""
    p = pathlib.Path(path)
    if p.is_file():
        if p.suffix == ".npz":
            with np.load(p) as z:
                return _flat_to_tree({k: z[k] for k in z.files})
        if p.suffix == ".safetensors":
            from safetensors.numpy import load_file
            return _flat_to_tree(load_file(str(p)))
        raise UserError(f"params file {path!r} is not .npz or .safetensors; pass an lvm-train workdir "
                        "or one of those.")
    if not p.is_dir():
        raise UserError(f"backbone params {path!r} do not exist; pass an lvm-train workdir, an orbax "
                        "checkpoint step directory or a .npz/.safetensors file.")
    import orbax.checkpoint as ocp
    state_dir = p
    if (p / "checkpoints").is_dir():
        steps = sorted(int(d.name) for d in (p / "checkpoints").iterdir() if d.name.isdigit())
        if not steps:
            raise UserError(f"{path!r} has no finished checkpoint yet; train it first (lvm-train).")
        state_dir = p / "checkpoints" / str(steps[-1]) / "state"
    elif (p / "state").is_dir():
        state_dir = p / "state"
    tree = _unwrap(ocp.StandardCheckpointer().restore(state_dir.absolute()))
    if isinstance(tree, dict) and "params" in tree:
        params = tree["params"]
        teacher = tree.get("extra", {}).get("teacher") if isinstance(tree.get("extra"), dict) else None
        if isinstance(teacher, dict) and "backbone" in teacher:  # DINOv2: the EMA teacher is the model
            return teacher["backbone"]
        return params.get("backbone", params) if isinstance(params, dict) else params
    return tree


def backbone_params(model, params: dict, image_size: int) -> dict:
    """`params` reduced to the backbone's keys (drops a classifier head); checks every shape."""
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    expected = nn.meta.unbox(jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3), jnp.float32))["params"])

    def take(exp, got, where):
        if isinstance(exp, dict):
            if not isinstance(got, dict):
                raise UserError(f"params at {where or 'top'} are not a dict; the checkpoint does not match "
                                "config.model.")
            missing = sorted(set(exp) - set(got))
            if missing:
                raise UserError(f"params miss {missing[:4]} at {where or 'top'}; the checkpoint was made "
                                "with another config.model.")
            return {k: take(exp[k], got[k], f"{where}/{k}") for k in exp}
        got = np.asarray(got)
        if tuple(got.shape) != tuple(exp.shape):
            raise UserError(f"param {where} has shape {got.shape} but config.model expects {exp.shape}; "
                            "the checkpoint was made with another config.model.")
        return got.astype(exp.dtype)

    return take(expected, params, "")


def build_backbone(config, mirror, rel: str, comm: Comm) -> tuple[Any, dict, dict]:
    """(model, params, description) for ``config.backbone`` of a curation config; a backbone that
    lvm-train trains lives in ``mirror``'s ``rel`` (uploaded when ``mirror`` is a bucket)."""
    import jax
    import jax.numpy as jnp
    from train.tasks.common import build_vit
    from lvm_jax.workdir import is_remote, local_copy
    model = build_vit(config.model, num_classes=None)
    size = int(config.embed.image_size)
    bb = config.backbone
    desc = dict(model=config.model.to_dict(), feature=config.embed.feature, image_size=size)
    if bb.get("params"):
        with local_copy(bb.params, "backbone.params") as path:
            params = backbone_params(model, read_params(path), size)
        desc["params"] = bb.params if is_remote(bb.params) else os.path.abspath(bb.params)
    elif bb.get("train_config"):
        if mirror.remote and comm.size > 1:  # each host's mirror is its own disk: no shared checkpoint
            raise UserError(f"several processes cannot train the backbone into the bucket output {mirror.out}; "
                            f"train it first (lvm-train --config {bb.train_config} --workdir "
                            f"{mirror.location(rel)}) and set config.backbone.params to that workdir.")
        workdir = mirror.path(rel)
        train_backbone(bb, workdir)
        if comm.rank == 0:
            mirror.push(rel)
        params = backbone_params(model, read_params(workdir), size)
        desc["params"] = dict(trained=bb.train_config, overrides=list(bb.get("train_overrides", ())))
    else:
        params = model.init(jax.random.PRNGKey(int(bb.get("seed", 0))),
                            jnp.zeros((1, size, size, 3), jnp.float32))["params"]
        desc["params"] = dict(random_init_seed=int(bb.get("seed", 0)))
    return model, params, desc


def train_backbone(bb, workdir: str) -> None:
    """Briefly trains the backbone with lvm-train (resumes; a finished run is a no-op)."""
    from lvm_jax.config import load_config
    from train.loop import train_and_evaluate
    cfg = load_config(bb.train_config, list(bb.get("train_overrides", ())))
    marker = pathlib.Path(workdir) / "checkpoints"
    steps = [int(d.name) for d in marker.iterdir() if d.name.isdigit()] if marker.is_dir() else []
    total = int(cfg.get("total_steps") or 0)
    if steps and total and max(steps) >= total:
        return
    train_and_evaluate(cfg, workdir)


# ----------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------
def add_embed_parser(sub, distributed_args) -> None:
    p = sub.add_parser("embed", help="embed one image set of a curation config into float16 shards")
    p.add_argument("--set", default="pool",
                   help="which set of the config: 'curated', 'pool' or 'reference:I'")
    p.add_argument("--out", default=None, help="output dir or gs:// / s3:// URL "
                   "(default: <config.out>/embeddings/<set>)")
    add_stage_arg(p)
    p.add_argument("--no-progress", action="store_true")
    distributed_args(p)


def add_run_parser(sub, distributed_args) -> None:
    p = sub.add_parser("run", help="images -> embeddings -> dedup -> retrieval -> manifest, from --config")
    p.add_argument("--out", default=None, help="output dir or gs:// / s3:// URL (default: config.out)")
    add_stage_arg(p)
    p.add_argument("--no-progress", action="store_true")
    distributed_args(p)


def add_stage_arg(p) -> None:
    p.add_argument("--stage", default=None, help="local mirror of a bucket --out (default: "
                   "~/.cache/lvm_jax/curate/<scheme>/<bucket>/<path>); see lvm_jax.curation.staging")


def _load(args, need_out: bool = True):
    from lvm_jax.config import load_config
    if not args.config:
        raise UserError(f"`lvm-curate {args.command}` needs --config, e.g. --config configs/curate_synthetic.py.")
    config = load_config(args.config, args.overrides)
    out = args.out or config.get("out") or ""
    if not out and (need_out or not args.out):
        raise UserError("no output directory: pass --out DIR or set config.out.")
    return config, out


def _sets(config) -> dict[str, Any]:
    sets = {"curated": config.curated, "pool": config.pool}
    for i, ref in enumerate(config.get("references", None) or ()):
        sets[f"reference:{i}"] = ref
    return sets


def _set_rel(name: str) -> str:
    """Where `lvm-curate run` keeps a set's embeddings, relative to its output."""
    return "embeddings/" + name.replace(":", "_")


def _embed_sets(config, mirror, dirs: dict[str, str], comm: Comm, progress: bool, backbone=None) -> None:
    """Embeds each named set of `config` into its directory (`dirs`: set name -> path relative to
    the mirror), uploading each shard as it lands when the output is a bucket.

    backbone: (mirror, relative path) of a backbone lvm-train trains; default ``mirror``'s 'backbone'.
    """
    from lvm_jax.data.manifest import open_image_source, source_spec
    sets = _sets(config)
    unknown = sorted(set(dirs) - set(sets))
    if unknown:
        raise UserError(f"--set {unknown[0]!r} is not one of {sorted(sets)}.")
    model, params, desc = build_backbone(config, *(backbone or (mirror, "backbone")), comm)
    e = config.embed
    embedder = Embedder(model, params, e.feature, int(e.batch_size))
    preprocess = make_preprocess(int(e.image_size), float(e.crop_pct), e.get("mean"), e.get("std"))
    for name, rel in dirs.items():
        spec = source_spec(sets[name], "train")
        directory = mirror.path(rel)
        meta = os.path.join(directory, INDEX_FILE)
        embed_source(open_image_source(spec), directory, embedder, preprocess, int(e.image_size),
                     int(e.shard_size), spec, desc, comm, int(e.workers), progress,
                     after_shard=lambda written: mirror.push_files([meta, *written]))
        if comm.rank == 0:
            mirror.push(rel)
    if mirror.remote and comm.size > 1:  # every shard is in the bucket: fetch the other processes'
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"lvm-curate uploaded {mirror.out}")
        for rel in dirs.values():
            mirror.pull(rel, progress=progress and comm.rank == 0)


def cmd_embed(args, init_distributed) -> int:
    config, _ = _load(args, need_out=False)
    comm = init_distributed(args)
    if args.out:
        mirror, rel = _open(args.out, args, "--out"), ""
    else:
        mirror, rel = _open(config.out, args, "config.out", _set_rel(args.set)), _set_rel(args.set)
    # A trained backbone lives in <config.out>/backbone (shared with `run`), else beside --out.
    if config.get("out") and not args.out:
        home = mirror
        mirror.pull("backbone", progress=not args.no_progress)
    elif config.get("out"):
        home = _open(config.out, args, "config.out", "backbone", own_stage=False)
    else:
        parent = mirror.out.rsplit("/", 1)[0] if mirror.remote else os.path.dirname(mirror.out)
        home = _open(parent, args, "--out", "backbone", own_stage=False)
    _embed_sets(config, mirror, {args.set: rel}, comm, not args.no_progress, backbone=(home, "backbone"))
    if comm.rank == 0:
        print(f"embeddings of {args.set!r} in {mirror.location(rel)}")
    return 0


def _open(out: str, args, what: str, rel: str = "", own_stage: bool = True):
    """The Mirror of `out`, its `rel` part filled from the bucket (resuming an earlier run's uploads).
    own_stage: False for a second mirror, which --stage (naming the --out mirror) does not apply to."""
    from lvm_jax.curation.staging import open_mirror
    return open_mirror(out, args.stage if own_stage else None, what, rel, progress=not args.no_progress)


def cmd_run(args, init_distributed) -> int:
    from lvm_jax.curation import pipeline
    from lvm_jax.curation.index import load_vectors
    from lvm_jax.curation.__main__ import _image_fn_for, _print_summary
    config, out = _load(args)
    comm = init_distributed(args)
    mirror = _open(out, args, "--out" if args.out else "config.out")
    t0 = time.perf_counter()
    names = list(_sets(config))
    _embed_sets(config, mirror, {n: _set_rel(n) for n in names}, comm, not args.no_progress)
    embed_s = time.perf_counter() - t0
    sets = {n: load_vectors(mirror.path(_set_rel(n)), n) for n in names}
    refs = [sets[n] for n in names if n.startswith("reference")]
    # summary.json names the embeddings where readers find them (the bucket, for a bucket --out);
    # the report reads the images through the local copies.
    where = {"curated": _set_rel("curated"), "pool": _set_rel("pool"),
             "references": [_set_rel(n) for n in names if n.startswith("reference")]}
    inputs = {k: [mirror.location(r) for r in v] if isinstance(v, list) else mirror.location(v)
              for k, v in where.items()}
    local = {k: [mirror.path(r) for r in v] if isinstance(v, list) else mirror.path(v)
             for k, v in where.items()}
    summary = pipeline.curate(sets["curated"], sets["pool"], mirror.local, refs, config.get("curation"), comm,
                              progress=not args.no_progress, inputs=inputs, image_fn=_image_fn_for(local))
    if comm.rank == 0:
        summary["timings_s"]["embed"] = round(embed_s, 3)
        pipeline.write_summary(mirror.local, summary)  # whole (a plain open() could leave half a file) and
        # with the embedding time in the total
        mirror.push()
        _print_summary(summary, mirror.location())
        print(f"train on it: lvm-train --config configs/vit_synthetic.py --workdir WORKDIR "
              f"--config.data.source=manifest --config.data.path={mirror.location()}")
    return 0
