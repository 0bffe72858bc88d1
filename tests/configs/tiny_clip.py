"""A 2-block CLIP (32 wide, 1-block text tower) on 16 px synthetic shapes: the clip task tests' config."""

import pathlib

from tests.helpers import set_dotted

ROOT = pathlib.Path(__file__).resolve().parents[2]


def tiny_clip_config(**overrides):
    """configs/clip_synthetic.py shrunk to seconds per run on 2 cores; `overrides` are dotted keys."""
    from lvm_jax.config import load_config_file

    c = load_config_file(str(ROOT / "configs" / "clip_synthetic.py"))
    c.model.embed_dim = 32
    v = c.model.vision
    v.width, v.depth, v.num_heads, v.mlp_dim, v.image_size = 32, 2, 2, 64, 16
    # 4 px patches (16 tokens) and the plain LayerNorm stem: the default's 8 px hybrid leaves 2x2 tokens at 16 px.
    v.patch_size, v.stem_widths, v.stem_norm = 4, None, "layer"
    t = c.model.text
    t.width, t.depth, t.num_heads, t.mlp_dim = 32, 1, 2, 64
    c.tokenizer.train_vocab_size = 600
    c.tokenizer.train_max_captions = 2000
    c.data.image_size = 16
    c.data.synthetic.image_size = 16
    c.data.synthetic.num_train = 512
    c.data.synthetic.num_eval = 40  # not a multiple of the eval batch: exercises the padding
    c.batch_size = 16
    c.eval_batch_size = 16
    c.total_steps = 6
    c.optim.warmup_steps = 2
    c.log_every = 1
    c.eval_every = 0
    c.ckpt_every = 3
    return set_dotted(c, overrides)


def get_config(arg=None):
    del arg
    return tiny_clip_config()
