"""The embedding step, `lvm-curate run`, the manifest training source, 2-process embedding."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lvm_jax.curation.__main__ import main as curate_main
from lvm_jax.curation.embed import Embedder, embed_source, make_preprocess
from lvm_jax.curation.index import load_vectors
from lvm_jax.data import SyntheticShapes, build_source
from lvm_jax.data.manifest import build_manifest_source
from lvm_jax.errors import UserError
from lvm_jax.models import ViT

TINY = dict(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=4, image_size=16,
            pool="cls", class_token=True)


def _tiny_model():
    model = ViT(num_classes=None, **TINY)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
    return model, params


def test_embedder_matches_plain_forward():
    model, params = _tiny_model()
    images = np.random.default_rng(0).standard_normal((10, 16, 16, 3)).astype(np.float32)
    emb = Embedder(model, params, "auto", batch_size=8)  # 8 devices; 10 images -> a padded batch
    got = emb(images)
    want = np.array(model.apply({"params": params}, images)["cls"])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert got.shape == (10, 32) and np.allclose(got, want, atol=1e-5)
    assert emb.calls == 2
    with pytest.raises(UserError, match="not divisible by the 8 local devices"):
        Embedder(model, params, batch_size=12)


def test_embed_source_writes_shards_and_resumes(tmp_path):
    model, params = _tiny_model()
    source = SyntheticShapes(40, seed=3, image_size=16, num_classes=4)
    pre = make_preprocess(16, crop_pct=1.0)
    out = str(tmp_path / "emb")
    spec = {"data": {"source": "synthetic"}, "split": "train"}
    first = Embedder(model, params, batch_size=8)
    meta = embed_source(source, out, first, pre, 16, shard_size=16, spec=spec, model_desc={"m": 1},
                        progress=False)
    assert meta["num_shards"] == 3 and meta["dim"] == 32 and first.calls == 2 + 2 + 1
    vs = load_vectors(out)
    assert len(vs) == 40 and vs.shards[0].dtype == np.float16
    assert np.array_equal(vs.ids, np.arange(40))
    assert np.array_equal(vs.labels, [source[i]["label"] for i in range(40)])
    ref = first(np.stack([pre(source[i]) for i in range(40)]))
    assert np.allclose(vs.read(), ref, atol=2e-3)  # float16 storage
    before = vs.read()

    # Interrupted run: shard 1 never finished.  A re-run embeds only that shard.
    os.remove(os.path.join(out, "emb_00001.npy"))
    with pytest.raises(UserError, match="emb_00001.npy' is missing"):
        load_vectors(out)
    again = Embedder(model, params, batch_size=8)
    embed_source(source, out, again, pre, 16, shard_size=16, spec=spec, model_desc={"m": 1}, progress=False)
    assert again.calls == 2
    assert np.array_equal(load_vectors(out).read(), before)
    with pytest.raises(UserError, match="different model"):
        embed_source(source, out, again, pre, 16, shard_size=16, spec=spec, model_desc={"m": 2},
                     progress=False)


def _write_config(tmp_path, **over) -> str:
    """A small curation config: 40 curated (4 classes), pool 120 + 20 exact copies + 10 reference copies."""
    text = textwrap.dedent(f"""
        import ml_collections as mlc

        def syn(seed, num, classes, split="train"):
            return mlc.ConfigDict(dict(source="synthetic", split=split, image_size=16,
                synthetic=mlc.ConfigDict(dict(num_train=num, num_eval=num, seed=seed, image_size=16,
                                              num_classes=classes))))

        def get_config():
            c = mlc.ConfigDict()
            c.out = {str(tmp_path / "run")!r}
            c.curated = syn(0, 40, 4)
            c.pool = [syn(1, 120, 8), syn(1, 20, 8), syn(0, 10, 4, "eval")]
            c.references = [syn(0, 30, 4, "eval")]
            c.model = mlc.ConfigDict({TINY!r})
            c.backbone = mlc.ConfigDict(dict(params="", train_config="", seed=0))
            c.embed = mlc.ConfigDict(dict(batch_size=16, shard_size=64, image_size=16, crop_pct=1.0,
                                          feature="auto", workers=2))
            # Random-init features: only identical images are near-duplicates.
            c.curation = mlc.ConfigDict(dict(dedup=dict(threshold=0.9999, reference_threshold=0.9999),
                                             retrieval=dict(k=3)))
            return c
    """)
    path = tmp_path / "curate_tiny.py"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def curated_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("run")
    config = _write_config(tmp_path)
    assert curate_main(["run", "--config", config, "--no-progress"]) == 0
    return tmp_path, config


def test_run_end_to_end(curated_run):
    tmp_path, _ = curated_run
    out = tmp_path / "run"
    summary = json.load(open(out / "summary.json"))
    dups = [json.loads(l) for l in open(out / "duplicates.jsonl")]
    self_removed = {d["id"] for d in dups if d["reason"] == "self"}
    ref_removed = {d["id"] for d in dups if d["reason"] == "reference"}
    # Pool rows 120..139 are exact copies of rows 0..19; 140..149 copies of reference images 0..9.
    assert set(range(120, 140)) <= self_removed
    assert all(d["kept"] == d["id"] - 120 for d in dups if d["reason"] == "self" and d["id"] >= 120)
    assert set(range(140, 150)) <= ref_removed
    assert all(d["kept"] == d["id"] - 140 for d in dups if d["id"] in range(140, 150))
    assert summary["counts"]["curated"] == 40 and summary["counts"]["pool"] == 150
    assert os.path.isfile(out / "report.html") and os.path.isfile(out / "retrieval.png")
    timings = summary["timings_s"]
    assert {"embed", "index", "retrieval"} <= set(timings)
    # The total includes the embedding time (it was the curation steps' sum only).
    assert timings["total"] == pytest.approx(sum(v for k, v in timings.items()
                                                 if k != "total" and not isinstance(v, bool)), abs=2e-3)
    assert not [f for f in os.listdir(out) if ".tmp" in f or ".part" in f]


def test_manifest_source_reads_back_images_and_labels(curated_run):
    tmp_path, _ = curated_run
    out = tmp_path / "run"
    lines = [json.loads(l) for l in open(out / "manifest.jsonl")]
    cfg = ml_collections.ConfigDict(dict(source="manifest", path=str(out)))
    src = build_source(cfg, "train")  # found through the data-source registry
    assert len(src) == len(lines) and src.num_classes == 4 and len(src.class_names) == 4
    curated = SyntheticShapes(40, seed=0, image_size=16, num_classes=4)
    pool = SyntheticShapes(120, seed=1, image_size=16, num_classes=8)
    for i, line in enumerate(lines):
        rec = src[i]
        assert rec["id"] == i and rec["image"].shape == (16, 16, 3) and rec["image"].dtype == np.uint8
        if line["source"] == "curated":
            want = curated[line["id"]]
        else:  # the retrieved image itself, labelled with its query's class
            assert line["id"] < 120  # planted copies are gone
            want = dict(pool[line["id"]], label=curated[line["query"]]["label"])
        assert np.array_equal(rec["image"], want["image"]) and rec["label"] == want["label"]
    ev = build_manifest_source(cfg, "eval")
    assert len(ev) == 40 and ev.num_classes == 4  # the curated source's eval split
    with pytest.raises(UserError, match="no manifest.jsonl"):
        build_manifest_source(ml_collections.ConfigDict(dict(path=str(tmp_path))), "train")


@pytest.mark.slow  # ~20 s alone, but the file must stay under 90 s on 2 shared cores
def test_train_on_manifest(curated_run, tmp_path):
    from lvm_jax.config import load_config
    from train.loop import train_and_evaluate
    run_dir, _ = curated_run
    config = load_config("configs/vit_synthetic.py", [
        "data.source=manifest", f"data.path={run_dir / 'run'}", "data.image_size=16", "model.image_size=16",
        "model.width=32", "model.depth=1", "model.num_heads=2", "model.mlp_dim=64", "batch_size=16",
        "eval_batch_size=8", "total_steps=3", "eval_every=3", "ckpt_every=3", "log_every=1",
        "optim.warmup_steps=1"])
    metrics = train_and_evaluate(config, tmp_path / "train")
    assert "top1" in metrics and np.isfinite(metrics["top1"])


@pytest.mark.slow  # ~20 s alone, but the file must stay under 90 s on 2 shared cores
def test_two_process_embedding_matches_one(curated_run, tmp_path):
    run_dir, config = curated_run
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    port = 21000 + os.getpid() % 20000
    out = tmp_path / "pool2"
    procs = [subprocess.Popen([sys.executable, "-m", "lvm_jax.curation", "embed", "--config", config,
                               "--set", "pool", "--out", str(out), "--no-progress",
                               "--config.embed.shard_size=32", "--coordinator", f"localhost:{port}",
                               "--num-processes", "2", "--process-id", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    two = load_vectors(str(out))
    one = load_vectors(str(run_dir / "run" / "embeddings" / "pool"))
    assert len(two.shards) == 5 and np.array_equal(two.ids, one.ids)
    assert np.allclose(two.read(), one.read(), atol=2e-3)
