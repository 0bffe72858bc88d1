"""ViT on the embedded synthetic shapes data set — the default job, no downloads.

Command:   lvm-train --config configs/vit_synthetic.py --workdir runs/vit_synthetic
Hardware:  2 CPU cores (any host); also runs unchanged on any GPU/TPU mesh.
Time:      about 4 minutes on 2 cores.
Expected:  top1 >= 0.95 on the synthetic eval split (10 shape classes; raw-pixel kNN <= 0.40).

Train the same config on your own images (ImageNet-style class folders):
  lvm-train --config configs/vit_synthetic.py --workdir W --config.data.source=folder --config.data.path=/data/pets
"""

import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.task = "supervised"
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(
        variant=None, width=128, depth=4, num_heads=4, mlp_dim=384, patch_size=4, image_size=32,
        num_classes=None,  # None: taken from the data source
        pool="gap", class_token=False, pos_embed="learned",
        drop_path_rate=0.0, dtype="float32", param_dtype="float32",
        stem="patch", attention_impl="xla", remat="none", scan_layers=False,
    ))

    c.data = ml_collections.ConfigDict(dict(
        source="synthetic", path="", name="", train_split="train", eval_split="validation",
        image_size=32, worker_count=0, prefetch=2, decode_errors="skip",
        rrc_scale=(0.6, 1.0), rrc_ratio=(3 / 4, 4 / 3), hflip=True, randaugment=None,
        eval_resize_ratio=1.0,
        synthetic=ml_collections.ConfigDict(dict(
            num_train=20000, num_eval=2000, seed=0, image_size=32, num_classes=10,
            # Difficulty knobs; None keeps lvm_jax.data.synthetic.Difficulty's default.
            size_range=None, max_rotation=None, position_spread=None, texture_contrast=None, clutter=None,
            noise_range=None)),
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.batch_size = 128
    c.eval_batch_size = 256
    c.total_steps = 1200
    c.label_smoothing = 0.0
    c.mixup_alpha = 0.0

    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=2e-3, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=100,
        schedule="cosine", end_lr_factor=0.01, clip_norm=1.0, layer_decay=1.0, grad_accum=1,
    ))
    c.log_every = 50
    c.eval_every = 400
    c.ckpt_every = 400
    c.keep_checkpoints = 2
    c.init_from = ""
    return c
