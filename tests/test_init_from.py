"""`config.init_from` wires converted weights into the trainer (lvm-train fine-tuning path)."""

from __future__ import annotations

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
