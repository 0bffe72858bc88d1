"""`config.init_from` wires converted weights into the trainer (lvm-train fine-tuning path)."""

from __future__ import annotations

import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lvm_jax.convert.pretrained import save_converted
from tests.helpers import tiny_supervised_config
from train.__main__ import main as train_main
from train.tasks.common import build_vit


def test_init_from_loads_converted_weights(tmp_path):
    config = tiny_supervised_config()
    model = build_vit(config.model, num_classes=10)
    variables = model.init(jax.random.PRNGKey(42), jnp.zeros((1, 16, 16, 3)))
    import flax.linen as nn

    variables = nn.meta.unbox(variables)
    save_converted(tmp_path / "pretrained", model, variables, format="lvm", source="test")

    # lr 0: the step changes nothing, so the saved checkpoint holds exactly the loaded weights.
    rc = train_main(["--config", "tests/configs/tiny_vit.py", "--workdir", str(tmp_path / "w"),
                     f"--config.init_from={tmp_path / 'pretrained'}", "--config.optim.lr=0.0",
                     "--config.total_steps=1", "--config.ckpt_every=0", "--config.optim.warmup_steps=0"])
    assert rc == 0
    restored = ocp.StandardCheckpointer().restore(tmp_path / "w" / "checkpoints" / "1" / "state")
    got = jax.tree_util.tree_leaves_with_path(restored["params"])
    want = jax.tree_util.tree_leaves(variables["params"])
    assert len(got) == len(want)
    for (path, g), w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=jax.tree_util.keystr(path))


def test_finetune_recipe_with_layer_decay_and_epochs_trains_and_lvm_eval_agrees(tmp_path):
    """configs/vit_finetune.py's optimizer: layer-wise lr decay, a run counted in epochs, a warmup.

    The lr multipliers were once jnp arrays made while the optimizer was built under
    jax.eval_shape, and the jitted step failed on its second call; lvm-eval refused the
    epoch-counted run (total_steps fell back to 1, below the warmup).
    """
    from train.loop import evaluate_checkpoint, train_and_evaluate

    # 512 train images / batch 16 = 32 steps per epoch: 0.125 epochs = 4 steps, 2 of them warmup.
    config = tiny_supervised_config(**{"optim.layer_decay": 0.75, "total_steps": 0, "total_epochs": 0.125,
                                       "ckpt_every": 0, "eval_every": 0})
    handler = signal.getsignal(signal.SIGTERM)
    final = train_and_evaluate(config, tmp_path / "w")
    assert signal.getsignal(signal.SIGTERM) is handler  # a library caller stays terminable
    logged = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in logged)
    assert evaluate_checkpoint(config, tmp_path / "w") == final


def test_layer_decay_multipliers_scale_each_block_and_survive_eval_shape():
    from lvm_jax.optim import build_optimizer

    config = tiny_supervised_config(**{"optim.layer_decay": 0.5, "optim.weight_decay": 0.0,
                                       "optim.clip_norm": 0.0, "optim.warmup_steps": 0})
    params = {"patch_embed": {"kernel": jnp.ones((3,))}, "encoder": {"blocks_0": {"w": jnp.ones((3,))},
                                                                      "blocks_1": {"w": jnp.ones((3,))}},
              "head": {"kernel": jnp.ones((3,))}}
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    # Built under eval_shape and kept, as the tasks do, then used in a jitted update called twice.
    built = {}

    def abstract_init(p):
        built["tx"] = build_optimizer(config.optim, 10, p, depth=2)[0]
        return built["tx"].init(p)

    jax.eval_shape(abstract_init, params)
    tx = built["tx"]
    update = jax.jit(tx.update)
    opt_state = tx.init(params)
    for _ in range(2):
        updates, opt_state = update(grads, opt_state, params)
    size = {k: float(jnp.abs(jax.tree_util.tree_leaves(v)[0][0])) for k, v in
            {"embed": updates["patch_embed"], "block0": updates["encoder"]["blocks_0"],
             "block1": updates["encoder"]["blocks_1"], "head": updates["head"]}.items()}
    # decay ** (depth + 1 - layer): 0.125, 0.25, 0.5, 1 for embeddings, block 0, block 1, head.
    np.testing.assert_allclose([size["embed"] / size["head"], size["block0"] / size["head"],
                                size["block1"] / size["head"]], [0.125, 0.25, 0.5], rtol=1e-5)
