"""A 2-block DINOv2 on 16 px synthetic shapes: the DINOv2 trainer tests' config (seconds per run on 2 cores)."""

import pathlib

from tests.helpers import set_dotted

ROOT = pathlib.Path(__file__).resolve().parents[2]


def tiny_dinov2_config(**overrides):
    """configs/dinov2_synthetic.py shrunk: width 32, 2 blocks, 16 px global / 8 px local crops, 64 prototypes."""
    from lvm_jax.config import load_config_file

    c = load_config_file(str(ROOT / "configs" / "dinov2_synthetic.py"))
    # The recipe's patch stem, LayerScale and teacher schedule (the synthetic default deviates for
    # short CPU runs): the tests name `patch_embed` leaves and check the recipe's momentum.
    c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, image_size=16, stem="patch",
                   layerscale_init=1e-5)
    c.teacher.update(momentum=0.992, warmup_temp=0.04, temp=0.07)
    c.head.update(num_prototypes=64, hidden_dim=64, bottleneck_dim=32, ibot_num_prototypes=64,
                  ibot_hidden_dim=64, ibot_bottleneck_dim=32, learn_prototype_gain=True)  # the recipe's head
    c.data.image_size = 16
    c.data.crops.update(global_size=16, local_size=8, num_local_crops=2)
    c.data.synthetic.update(image_size=16, num_train=96, num_eval=32)
    c.batch_size = 16
    c.eval_batch_size = 16
    c.total_steps = 6
    c.optim.update(lr=1e-3, warmup_steps=2, freeze_last_layer_steps=1)
    c.teacher.temp_warmup_steps = 3
    c.eval.update(train_subset=64, knn_ks=(5, 20), linear_probe=False, pictures=2)
    c.log_every = 1
    c.eval_every = 0
    c.ckpt_every = 3
    return set_dotted(c, overrides)


def get_config(arg=None):
    del arg
    return tiny_dinov2_config()
