"""DINOv2 ViT-L/14: the published "long setup" recipe (dinov2/configs/train/vitl14.yaml), FSDP-sharded.

Command:   lvm-train --config configs/dinov2_vitl14_in22k.py --workdir runs/dinov2_vitl14 \
               --config.data.path=/data/imagenet22k        # root/<class>/*.JPEG
           Any curated image set works the same way, e.g. the manifest folder written by lvm-curate
           (the LVD-142M recipe of the paper: curated retrieval-augmented data, not public).
Hardware:  96 accelerators (global batch 3072 = 96 x 32, as the reference's 12 nodes x 8 A100);
           parameters, teacher and Adam moments sharded 8-way over `fsdp` (mesh data=-1, fsdp=8).
           625k steps (500 "epochs" of 1250 steps).
Time:      about 3.3 days on 96 A100 (the reference's figure for this recipe).

Published numbers (ImageNet-1k val, top-1):
  * this recipe on ImageNet-22k (DINOv2 README, "long setup"): k-NN 82.0, linear 84.5;
  * the released DINOv2 ViT-L/14 (distilled from ViT-g/14 on LVD-142M): k-NN 83.5, linear 86.3
    (with 4 registers, --config.model.num_registers=4: 83.8 / 86.7);
  * DINOv2 ViT-g/14 on LVD-142M: k-NN 83.5, linear 86.5.
During training `knn_top1` / `linear_top1` use a 1% hold-out of the training folder; for the
ImageNet-1k numbers above evaluate a checkpoint on ImageNet-1k (k-NN with the whole train split as
the memory bank, as DINOv2):
  lvm-eval --config configs/dinov2_vitl14_in22k.py --workdir runs/dinov2_vitl14 \
      --config.data.source=tfds --config.data.name=imagenet2012 --config.eval.train_subset=0
(`linear_top1` is a miniature of DINOv2's linear eval: frozen features, no augmentation.)

Recipe (differences from the ViT-S/14 ImageNet-1k config): ViT-L/14 with SwiGLU FFN, drop-path 0.4,
local crops 98 px (7 x 7 patches of 14), the paper's blur probabilities (see the ViT-S/14 config);
131072 prototypes with a 384-d bottleneck, a separate iBOT head (131072
prototypes); Sinkhorn-Knopp targets; teacher momentum 0.994 -> 1; lr 2e-4 * sqrt(3072 / 1024)
with 80 warmup epochs; weight decay 0.04 -> 0.2; no layer-wise lr decay.
"""

import math

import ml_collections

EPOCH = 1250  # DINOv2's OFFICIAL_EPOCH_LENGTH


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.task = "dinov2"
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(
        variant="L/14", image_size=224, pool="cls", class_token=True, num_registers=0, pos_embed="learned",
        pos_embed_interp="dinov2", layerscale_init=1e-5, ffn="swiglu", drop_path_rate=0.4, drop_path_uniform=True,
        use_mask_token=True, dtype="bfloat16", param_dtype="float32", attention_impl="auto", remat="full",
        scan_layers=True,
    ))
    c.head = ml_collections.ConfigDict(dict(
        num_prototypes=131072, hidden_dim=2048, bottleneck_dim=384, num_layers=3,
        separate_ibot_head=True, ibot_num_prototypes=131072, ibot_hidden_dim=2048, ibot_bottleneck_dim=256,
        ibot_num_layers=3,
        learn_prototype_gain=True,  # DINOv2 trains the weight norm's gain (weight_g)
    ))
    c.dino = ml_collections.ConfigDict(dict(
        loss_weight=1.0, student_temp=0.1, centering="sinkhorn_knopp", center_momentum=0.9, sinkhorn_iterations=3,
        koleo_loss_weight=0.1, koleo_num_groups=0,
    ))
    c.ibot = ml_collections.ConfigDict(dict(loss_weight=1.0, mask_ratio=(0.1, 0.5), mask_probability=0.5))
    c.teacher = ml_collections.ConfigDict(dict(
        momentum=0.994, final_momentum=1.0, warmup_temp=0.04, temp=0.07, temp_warmup_steps=30 * EPOCH))

    c.data = ml_collections.ConfigDict(dict(
        source="folder", path="", name="", train_split="train", eval_split="validation",
        holdout_fraction=0.01, image_size=224, eval_resize_ratio=0.875, worker_count=16, eval_worker_count=8,
        prefetch=2, read_threads=16, decode_errors="skip",
        crops=ml_collections.ConfigDict(dict(
            global_size=224, local_size=98, num_local_crops=8, global_scale=(0.32, 1.0),
            local_scale=(0.05, 0.32), released_code_blur=False)),
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=8, tensor=1))
    c.batch_size = 3072
    c.eval_batch_size = 1536
    c.total_steps = 500 * EPOCH

    c.optim = ml_collections.ConfigDict(dict(
        lr=2e-4 * math.sqrt(3072 / 1024), min_lr=1e-6, warmup_steps=80 * EPOCH, weight_decay=0.04,
        weight_decay_end=0.2, b1=0.9, b2=0.999, eps=1e-8, clip_norm=3.0, layer_decay=1.0,
        patch_embed_lr_mult=0.2, freeze_last_layer_steps=1 * EPOCH,
    ))
    c.eval = ml_collections.ConfigDict(dict(
        train_subset=100_000, knn_ks=(10, 20, 100), knn_temperature=0.07, linear_probe=True, linear_epochs=10,
        pictures=4,
    ))
    c.log_every = 100
    c.eval_every = 10 * EPOCH
    c.ckpt_every = 2 * EPOCH
    c.keep_checkpoints = 3
    c.compile_cache_dir = ""  # XLA compile cache: "" = WORKDIR/compile_cache, a path, or "none"
    c.init_from = ""
    return c
