"""Task `clip`: sharded step == 1-device step, GradCache accumulation == big batch, LiT, temperature
clamp, evals against a brute-force recomputation, resume, and bad input through the CLI.

Every compile costs seconds on 2 cores, so one initial state (created once, on 1 device) and one
compiled 1-device step serve most tests.
"""

from __future__ import annotations

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lvm_jax import sharding
from lvm_jax.evals import retrieval
from lvm_jax.data import synthetic
from lvm_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lvm_jax.objectives.contrastive import sigmoid_contrastive_loss, softmax_contrastive_loss
from tests.configs.tiny_clip import tiny_clip_config
from train.loop import abstract_state, compile_train_step, create_state, evaluate_checkpoint, train_and_evaluate
from train.tasks import get_task

SIGLIP = {"loss": "sigmoid", "model.init_logit_scale": math.log(10.0), "model.init_logit_bias": -10.0}
# width 64 / mlp 128 / 4 heads: every sharded dimension divides 8, 4 and 2.
WIDE = {"model.vision.width": 64, "model.vision.mlp_dim": 128, "model.vision.num_heads": 4,
        "model.text.width": 64, "model.text.mlp_dim": 128, "model.text.num_heads": 4}
needs_8_devices = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 (simulated) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")


def _mesh(shape):
    devices = jax.devices()[: int(np.prod(shape))]
    return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), devices=devices)


def _batch(task, seed=0):
    """Random images and real synthetic captions: `{image [B, S, S, 3], tokens [B, L]}`."""
    rng = np.random.default_rng(seed)
    size, n = task.config.data.image_size, task.config.batch_size
    scenes = synthetic.sample_scenes(np.arange(seed * n, (seed + 1) * n))
    captions = [synthetic.caption(scenes, i) for i in range(n)]
    return {"image": rng.normal(size=(n, size, size, 3)).astype(np.float32),
            "tokens": task.tokenizer(captions, task.context_length)}


@pytest.fixture(scope="module")
def initial():
    """(1-device task, its initial TrainState on the host)."""
    mesh = _mesh((1, 1, 1))
    task = get_task(tiny_clip_config(**WIDE), mesh)
    rng = jax.random.PRNGKey(0)
    _, shardings = abstract_state(task, mesh, rng)
    return task, jax.device_get(create_state(task, shardings, rng))


def _setup(initial, mesh_shape, **overrides):
    """(task for `config + overrides` on a mesh, the shared initial state in its layout, its shardings, mesh)."""
    mesh = _mesh(mesh_shape)
    task = get_task(tiny_clip_config(**WIDE, **overrides), mesh)
    _, state = initial
    params = dict(state.params)
    if task.loss_kind == "sigmoid":  # SigLIP's temperature and bias init
        params.update(logit_scale=np.float32(math.log(10.0)), logit_bias=np.float32(-10.0))
    tx = task.optimizer(params)
    state = state.replace(params=params, tx=tx, opt_state=tx.init(params))
    shardings = abstract_state(task, mesh, jax.random.PRNGKey(0))[1]
    return task, jax.device_put(state, shardings), shardings, mesh


def _steps(task, state, shardings, mesh, steps=2, step=None):
    with sharding.mesh_context(mesh):
        if step is None:
            step = compile_train_step(task, shardings, sharding.host_to_global(_batch(task), mesh), mesh)
        else:  # a shared step: keep the caller's state (the step donates its input)
            state = jax.tree_util.tree_map(jnp.copy, state)
        for i in range(steps):
            state, metrics = step(state, sharding.host_to_global(_batch(task, i), mesh))
    return jax.device_get(state.params), jax.device_get(metrics)


def _assert_trees_close(got, want, rel=1e-5):
    flat_want = jax.tree_util.tree_leaves_with_path(want)
    flat_got = jax.tree_util.tree_leaves(got)
    assert len(flat_want) == len(flat_got)
    for (path, w), g in zip(flat_want, flat_got):
        name = jax.tree_util.keystr(path)
        if name.endswith("['key']['bias']"):
            # Its exact gradient is zero (softmax ignores a per-query shift), so it holds only
            # float noise that no two reduction orders reproduce; check that it stayed noise.
            assert np.abs(g).max() < 1e-5 and np.abs(w).max() < 1e-5, name
            continue
        # Floor 1e-2: zero-initialised biases move by ~lr in Adam's first steps however small their
        # gradient, so a near-zero gradient element turns float noise into ~1e-8 differences.
        scale = max(float(np.abs(w).max()), 1e-2)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=rel * scale, err_msg=name)


# --------------------------------------------------------------------------------- sharding
@pytest.fixture(scope="module")
def single(initial):
    """(task, state, shardings, mesh, compiled step) on one device."""
    task, state, shardings, mesh = _setup(initial, (1, 1, 1))
    with sharding.mesh_context(mesh):
        step = compile_train_step(task, shardings, sharding.host_to_global(_batch(task), mesh), mesh)
    return task, state, shardings, mesh, step


@pytest.fixture(scope="module")
def reference(single):
    task, state, shardings, mesh, step = single
    return _steps(task, state, shardings, mesh, step=step)


@needs_8_devices
@pytest.mark.parametrize("mesh_shape, extra", [
    ((8, 1, 1), {}),
    # GradCache is exact, so 2 micro-batches on 2x2x2 must still equal the 1-device big-batch step.
    ((2, 2, 2), {"optim.grad_accum": 2}),
], ids=["dp8", "2x2x2-accum2"])
def test_sharded_step_matches_single_device(initial, reference, mesh_shape, extra):
    params, metrics = _steps(*_setup(initial, mesh_shape, **extra))
    ref_params, ref_metrics = reference
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    _assert_trees_close(params, ref_params)


@needs_8_devices
@pytest.mark.slow
def test_sharded_ring_sigmoid_step_matches_single_device(initial):
    want_params, want = _steps(*_setup(initial, (1, 1, 1), **SIGLIP))
    got_params, got = _steps(*_setup(initial, (2, 2, 2), **SIGLIP, ring_loss=True))
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    _assert_trees_close(got_params, want_params)


# --------------------------------------------------------------------------------- accumulation
def _reference_grad_fn(task):
    """Independent big-batch reference, jitted: (params, batch) -> (naive B x B loss on eval-mode towers
    (no dropout is configured), its gradients)."""
    model = task.model

    def loss_fn(p, batch):
        img = model.apply({"params": p}, batch["image"], method="encode_image")
        txt = model.apply({"params": p}, batch["tokens"], method="encode_text")
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        scale = jnp.exp(p["logit_scale"])
        if task.loss_kind == "softmax":
            return softmax_contrastive_loss(img, txt, scale)
        return sigmoid_contrastive_loss(img, txt, scale, p["logit_bias"])

    return jax.jit(jax.value_and_grad(loss_fn))


@pytest.mark.parametrize("loss", ["softmax", pytest.param("sigmoid", marks=pytest.mark.slow)])
def test_gradcache_accumulation_equals_big_batch(initial, loss):
    k = 4
    task, state, _, mesh = _setup(initial, (1, 1, 1), **(SIGLIP if loss == "sigmoid" else {}),
                                  **{"optim.grad_accum": k})
    batch = {key: jnp.asarray(v) for key, v in _batch(task).items()}
    with sharding.mesh_context(mesh):
        loss_k, grads_k = jax.jit(task.loss_and_grads)(state.params, batch, jax.random.PRNGKey(1))
    reference = _reference_grad_fn(task)
    loss_ref, grads_ref = reference(state.params, batch)
    np.testing.assert_allclose(loss_k, loss_ref, rtol=1e-5)
    for (path, ref), got in zip(jax.tree_util.tree_leaves_with_path(grads_ref), jax.tree_util.tree_leaves(grads_k)):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))

    # The comparison can fail: averaging per-micro-batch gradients (each seeing B/k negatives) differs.
    averaged = [reference(state.params, {key: v[i::k] for key, v in batch.items()})[1] for i in range(k)]
    averaged = jax.tree_util.tree_map(lambda *g: sum(g) / k, *averaged)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree_util.tree_leaves(averaged), jax.tree_util.tree_leaves(grads_ref)))
    assert diff > 1e-3


@pytest.mark.slow
def test_gradcache_with_patch_dropout_equals_big_batch(initial):
    """Stochastic layers: both GradCache passes must draw the same patch-dropout mask per micro-batch."""
    k = 2
    task, state, _, mesh = _setup(initial, (1, 1, 1), **{"optim.grad_accum": k, "model.vision.patch_dropout": 0.5})
    batch = {key: jnp.asarray(v) for key, v in _batch(task).items()}
    rng = jax.random.PRNGKey(3)

    def big_batch_loss(p):  # the same per-micro-batch keys, one naive B x B loss over everything
        parts = [task.embed(p, batch["image"][i::k], batch["tokens"][i::k], jax.random.fold_in(rng, i))
                 for i in range(k)]
        img = jnp.concatenate([a for a, _ in parts])
        txt = jnp.concatenate([b for _, b in parts])
        return softmax_contrastive_loss(img, txt, jnp.exp(p["logit_scale"]))

    with sharding.mesh_context(mesh):
        loss_k, grads_k = jax.jit(task.loss_and_grads)(state.params, batch, rng)
        loss_ref, grads_ref = jax.jit(jax.value_and_grad(big_batch_loss))(state.params)
    np.testing.assert_allclose(loss_k, loss_ref, rtol=1e-5)
    for (path, ref), got in zip(jax.tree_util.tree_leaves_with_path(grads_ref), jax.tree_util.tree_leaves(grads_k)):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


# --------------------------------------------------------------------------------- LiT
def _paths(tree):
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in leaves}


@pytest.mark.parametrize("unlocked, frozen_prefixes", [
    (0, ("image_tower/", "image_proj/")),
    # the tiny tower is conv_stem, pos_embed, encoder/blocks_{0,1}, norm (gap pool, no cls token)
    (1, ("image_tower/conv_stem/", "image_tower/pos_embed", "image_tower/encoder/blocks_0/")),
])
def test_lit_freezes_exactly_the_image_tower(initial, unlocked, frozen_prefixes):
    task, state, _, _ = _setup(initial, (1, 1, 1), **{"lit.lock_image": True, "lit.unlocked_blocks": unlocked,
                                                       "optim.weight_decay": 0.1, "optim.warmup_steps": 0})
    params = jax.device_get(state.params)
    grads = jax.tree_util.tree_map(np.ones_like, params)
    updates, _ = state.tx.update(grads, state.opt_state, params)
    updates = _paths(updates)
    frozen = {p for p in updates if p.startswith(frozen_prefixes)}
    assert frozen and len(frozen) < len(updates)
    for path, update in updates.items():
        assert (not np.any(update)) == (path in frozen), path


@pytest.mark.slow
def test_locked_tower_gets_no_backward_pass(initial):
    task, state, _, mesh = _setup(initial, (1, 1, 1), **{"lit.lock_image": True})
    batch = {key: jnp.asarray(v) for key, v in _batch(task).items()}
    with sharding.mesh_context(mesh):
        _, grads = jax.jit(task.loss_and_grads)(state.params, batch, jax.random.PRNGKey(0))
    for path, g in _paths(grads).items():
        assert (not np.any(g)) == path.startswith(("image_tower/", "image_proj/")), path


def test_lit_rejects_bad_unlock():
    with pytest.raises(ValueError, match=r"unlocked_blocks=3 is outside \[0, 2\]"):
        get_task(tiny_clip_config(**{"lit.lock_image": True, "lit.unlocked_blocks": 3}), _mesh((1, 1, 1)))


# --------------------------------------------------------------------------------- temperature
def test_logit_scale_is_clamped_after_every_step(single):
    task, state, _, mesh, step = single
    state = jax.tree_util.tree_map(jnp.copy, state)  # the step donates its input
    ln100 = np.float32(math.log(100.0))
    with sharding.mesh_context(mesh):
        batch = sharding.host_to_global(_batch(task), mesh)
        for value, want in ((5.0, ln100), (-0.5, np.float32(0.0)), (2.0, None)):
            params = dict(state.params)
            params["logit_scale"] = jax.device_put(np.float32(value), state.params["logit_scale"].sharding)
            state, metrics = step(state.replace(params=params), batch)
            got = np.float32(state.params["logit_scale"])
            if want is None:  # inside [0, ln 100]: the optimizer moved it and nothing clamped it
                assert 0 < abs(got - 2.0) < 0.01
            else:
                assert got == want
            np.testing.assert_allclose(metrics["logit_scale"], np.exp(got), rtol=1e-6)


# --------------------------------------------------------------------------------- evals
def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_evals_match_brute_force(single):
    """zero-shot and retrieval metrics of `evaluate`, recomputed from rendered images in NumPy."""
    task, state, *_ = single
    result = task.evaluate(state, 0)
    assert set(result) == {"zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class_recall",
                           "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}

    config, params = task.config, jax.device_get(state.params)
    n, size = config.data.synthetic.num_eval, config.data.image_size
    images, labels, captions = synthetic.render(np.arange(n), split="eval", image_size=size)
    images = (images / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)

    def encode_text(texts):
        return _unit(task.model.apply({"params": params}, task.tokenizer(texts, task.context_length),
                                      method="encode_text"))

    img = _unit(task.model.apply({"params": params}, jnp.asarray(images, jnp.float32), method="encode_image"))
    classes = [_unit(encode_text([t.format(name) for t in synthetic.ZEROSHOT_TEMPLATES]).mean(0))
               for name in synthetic.CLASS_NAMES]
    order = np.argsort(-(img @ np.stack(classes).T), axis=1)
    assert result["zeroshot_top1"] == pytest.approx(np.mean(order[:, 0] == labels), abs=1e-6)
    assert result["zeroshot_top5"] == pytest.approx(np.mean([labels[i] in order[i, :5] for i in range(n)]), abs=1e-6)
    sims = img @ encode_text(captions).T  # one caption per image
    for k in (1, 5, 10):
        assert result[f"i2t_r{k}"] == pytest.approx(np.mean([i in np.argsort(-sims[i])[:k] for i in range(n)]))
        assert result[f"t2i_r{k}"] == pytest.approx(np.mean([j in np.argsort(-sims[:, j])[:k] for j in range(n)]))
    assert 0 < result["t2i_r5"] < 1  # not degenerate


def test_zeroshot_templates_never_occur_in_training_captions():
    from train.tasks.clip import source_captions

    task = get_task(tiny_clip_config(), _mesh((1, 1, 1)))
    captions = source_captions(task.train_source(), 2000)
    for template in synthetic.ZEROSHOT_TEMPLATES:
        stem = template.split("{}")[0].strip()  # "a photo of a", "a rendering of a"
        assert not any(stem in c for c in captions), stem
    # The tokenizer is trained deterministically: a resumed run or lvm-eval rebuilds the same ids.
    again = get_task(tiny_clip_config(), _mesh((1, 1, 1)))
    assert again.tokenizer.merges == task.tokenizer.merges


# --------------------------------------------------------------------------------- resume
# The tokenizers BPE trainer breaks equal-count ties by token ids it hands out in hash-map order
# (huggingface/tokenizers#1794), so two trainings on the same captions could differ: a resumed run
# or lvm-eval then fed the text tower other ids. train_bpe now numbers the '</w>' symbols up front.


def test_trained_tokenizer_is_the_same_every_time():
    """48 captions leave many equal-count pairs: every call must still break the ties the same way."""
    from lvm_jax.data import build_source
    from train.tasks.clip import build_tokenizer

    config = tiny_clip_config(**{"data.synthetic.num_train": 48})
    source = build_source(config.data, split="train")
    first = build_tokenizer(config.tokenizer, source)
    assert len(first.merges) > 50  # enough merges that ties matter
    for _ in range(20):  # unpatched, each call matched the first only about half the time
        assert build_tokenizer(config.tokenizer, source).merges == first.merges


def _state(workdir, step):
    return ocp.StandardCheckpointer().restore((workdir / "checkpoints" / str(step) / "state").absolute())


@pytest.mark.slow
def test_resume_is_bitwise_exact_and_lvm_eval_agrees(tmp_path):
    """6 steps straight == 3 steps, restore, 3 more (48 rows / 16 per batch: epochs wrap)."""
    config = tiny_clip_config(**{"data.synthetic.num_train": 48})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    final = train_and_evaluate(config, straight)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")  # as if killed after the step-3 checkpoint
    train_and_evaluate(config, resumed)
    a, b = _state(straight, 6), _state(resumed, 6)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())}
              for w in (straight, resumed)]
    for step in (4, 5, 6):
        assert losses[0][step] == losses[1][step]
    # A fresh task (new tokenizer, restored params) scores both runs' checkpoints as the run itself did.
    assert evaluate_checkpoint(config, straight) == pytest.approx(final)
    assert evaluate_checkpoint(config, resumed) == pytest.approx(final)

    # LiT: config.init_from copies the image tower (and projection) of a checkpoint into a fresh state.
    lit = get_task(tiny_clip_config(**{"lit.lock_image": True, "init_from": str(straight)}), _mesh((1, 1, 1)))
    rng = jax.random.PRNGKey(1)
    fresh = create_state(lit, abstract_state(lit, lit.mesh, rng)[1], rng)
    loaded = jax.device_get(lit.load_pretrained(fresh, str(straight)).params)
    for part in ("image_tower", "image_proj"):
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a["params"][part]),
                                jax.tree_util.tree_leaves(loaded[part])):
            np.testing.assert_array_equal(np.asarray(x), y, err_msg=part + jax.tree_util.keystr(path))
    assert not np.array_equal(loaded["text_proj"]["kernel"], np.asarray(a["params"]["text_proj"]["kernel"]))


# --------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("overrides, message", [
    (["--config.loss=cosine"], "config.loss='cosine' is unknown"),
    (["--config.ring_loss=True"], "config.ring_loss=True needs config.loss='sigmoid'"),
    (["--config.loss=sigmoid"], "needs a learnable logit bias"),
    (["--config.optim.grad_accum=3"], "config.optim.grad_accum=3 must split config.batch_size=16"),
    (["--config.lit.lock_image=True", "--config.lit.unlocked_blocks=5"], "unlocked_blocks=5 is outside [0, 2]"),
    (["--config.tokenizer.path=/nonexistent/vocab.txt.gz"], "/nonexistent/vocab.txt.gz"),
    (["--config.model.text.vocab_size=100"], "is smaller than the tokenizer's"),
    (["--config.model.text.pool=first"], "pool='first' with a causal text tower gives every caption the same"),
    (["--config.data.source=captions", "--config.data.path=/nonexistent/pairs.jsonl"], "/nonexistent/pairs.jsonl"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, overrides, message):
    from train.__main__ import main as train_main

    rc = train_main(["--config", "tests/configs/tiny_clip.py", "--workdir", str(tmp_path / "w"), *overrides])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


# --------------------------------------------------------------------------------- caption word dropout
def test_caption_word_dropout_keeps_an_ordered_subset_at_rate_p():
    from train.tasks.clip import CaptionWordDropout

    caption = "a small red circle on a striped blue background"
    words = caption.split()
    record = {"caption": caption, "id": 7}
    assert CaptionWordDropout(0.0).random_map(dict(record), np.random.default_rng(0)) == record
    drop = CaptionWordDropout(0.3)
    rng = np.random.default_rng(0)
    kept = 0
    for _ in range(2000):
        out = drop.random_map(dict(record), rng)
        assert out["id"] == 7
        got = out["caption"].split()
        assert 1 <= len(got) <= len(words)
        it = iter(words)  # an order-preserving subsequence of the original words
        assert all(any(w == x for x in it) for w in got), out["caption"]
        kept += len(got)
    # Expected kept fraction 0.7 (the at-least-one-word rule adds 0.3**9 ~ 2e-5); 2000 x 9 draws: sd ~0.0034.
    assert kept / (2000 * len(words)) == pytest.approx(0.7, abs=0.015)
    # Everything dropped -> exactly one random word survives.
    one = CaptionWordDropout(0.999)
    outs = {one.random_map(dict(record), rng)["caption"] for _ in range(300)}
    assert outs <= set(words) and len(outs) > 3


def test_caption_word_dropout_reaches_the_training_pipeline_only():
    from train.tasks.clip import CaptionWordDropout

    task = get_task(tiny_clip_config(**{"data.caption_word_dropout": 0.2}), _mesh((1, 1, 1)))
    assert any(isinstance(t, CaptionWordDropout) for t in task.train_transforms())
    assert not any(isinstance(t, CaptionWordDropout) for t in task.eval_transforms(task.config.data))
    with pytest.raises(Exception, match="caption_word_dropout"):
        get_task(tiny_clip_config(**{"data.caption_word_dropout": 1.0}), _mesh((1, 1, 1))).train_transforms()


# --------------------------------------------------------------------------------- padding
def test_last_position_pooling_pads_with_eot_in_training_eval_and_prompts(monkeypatch):
    """A tower pooled at the last position (SigLIP) must read EOT there for every caption, as
    big_vision pads ("sticky" EOS); zero padding would pool the embedding of '!' (id 0)."""
    from train.tasks.clip import TokenizeCaption

    record = {"image": np.zeros((2, 2, 3), np.float32), "caption": "a red circle", "label": 0, "id": 0}
    for pool, pad in (("eot", 0), ("last", None)):
        task = get_task(tiny_clip_config(**{"model.text.pool": pool, "model.text.causal": pool == "eot",
                                            "evals.templates": ["a {}."]}), _mesh((1, 1, 1)))
        eot = task.tokenizer.eot_token_id
        pad = eot if pad is None else pad
        for transforms in (task.train_transforms(), task.eval_transforms(task.config.data)):
            tokens = next(t for t in transforms if isinstance(t, TokenizeCaption)).map(dict(record))["tokens"]
            n = int(np.argmax(tokens == eot))  # the first EOT ends the caption
            assert 2 < n < len(tokens) - 1 and (tokens[n + 1:] == pad).all(), (pool, tokens)
        # Zero-shot prompts go through the same padding.
        seen = []
        monkeypatch.setattr(retrieval, "embed_arrays", lambda fn, params, tokens, *a: seen.append(tokens) or
                            np.ones((len(tokens), 4), np.float32))
        task.zeroshot_classifier(None, type("Source", (), {"class_names": ["circle", "square"]}))
        assert seen and all((np.argmax(t == eot, axis=1) < t.shape[1] - 1).all() and (t[:, -1] == pad).all()
                            for t in seen), pool
    with pytest.raises(Exception, match="pad_mask"):
        get_task(tiny_clip_config(**{"model.text.pool": "last", "model.text.causal": False,
                                     "model.text.pad_mask": True}), _mesh((1, 1, 1))).train_transforms()
