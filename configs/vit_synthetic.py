"""ViT on the embedded synthetic shapes data set — the default job, no downloads.

Command:   lvm-train --config configs/vit_synthetic.py --workdir runs/vit_synthetic
Hardware:  2 CPU cores (any host); also runs unchanged on any GPU/TPU mesh.
Time:      3 min 17 s on 2 quiet CPU cores (2000 steps x 128 images, ~1400 img/s; 2026-11-26).
Measured:  top1 0.7155 (top5 0.985) on the synthetic eval split after 2000 steps; 0.572 at 1000.
           The issue-2 goal (>= 0.95 in 5 minutes) is NOT reached: this hybrid plateaus slowly, and a
           plain patch-4 ViT needs ~300k images (~20 min here) to pass 0.94 (measured on a GPU).

Model: a small hybrid ViT (Dosovitskiy et al. 2021, sec. 3.1; Xiao et al. 2021): a 3-conv stem
turns each 8x8 patch into a token (4x4 tokens at 32 px), then 4 transformer blocks. On this data
it learns ~3x faster per image than a plain patch-4 ViT (0.41 vs 0.23 top1 after 25.6k images)
at ~5x the img/s on 2 cores. Adam b2 = 0.95 (faster second-moment adaptation for a short run).
Set `model.stem=patch model.patch_size=4` for the plain ViT.

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
        variant=None, width=128, depth=4, num_heads=4, mlp_dim=384, patch_size=8, image_size=32,
        num_classes=None,  # None: taken from the data source
        pool="gap", class_token=False, pos_embed="learned",
        drop_path_rate=0.0, dtype="float32", param_dtype="float32",
        stem="conv", attention_impl="xla", remat="none", scan_layers=False,
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
    c.total_steps = 2000
    c.label_smoothing = 0.0
    c.mixup_alpha = 0.0

    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=2e-3, weight_decay=0.05, b1=0.9, b2=0.95, eps=1e-8, warmup_steps=100,
        schedule="cosine", end_lr_factor=0.01, clip_norm=1.0, layer_decay=1.0, grad_accum=1,
    ))
    c.log_every = 50
    c.eval_every = 1000
    c.ckpt_every = 1000
    c.keep_checkpoints = 2
    c.init_from = ""
    return c
