"""DINOv2 ViT-S/14 on ImageNet-1k: the published "fast setup" recipe (dinov2/configs/train/vitl16_short.yaml
= ssl_default_config.yaml) with a ViT-S/14 backbone.

Command:   lvm-train --config configs/dinov2_vits14_in1k.py --workdir runs/dinov2_vits14_in1k
           (ImageNet-1k prepared once as TFDS array_record: `tfds build imagenet2012 --file_format=array_record`;
           add --config.data.path=DIR if it is not in ~/tensorflow_datasets)
Hardware:  32 accelerators (global batch 2048 = 32 x 64, as the reference's 4 nodes x 8 A100); any mesh
           whose data x fsdp size divides 2048. 125k steps (100 "epochs" of 1250 steps).
Time:      about half a day on 32 A100-class chips (the reference trains ViT-L/16 in ~1 day on 32 A100).

Published numbers (ImageNet-1k val, top-1):
  * DINOv2 ViT-S/14 distilled (from ViT-g/14 on LVD-142M): k-NN 79.0, linear 81.1 (with 4 registers:
    79.1 / 80.9) -- the released model; this config does not distil, so expect less.
  * The same recipe from scratch on ImageNet-1k with ViT-L/16 (vitl16_short.yaml): k-NN 81.6, linear 82.9.
  * For scale: DINO (v1) ViT-S/16, 800 epochs on ImageNet-1k: k-NN 74.5, linear 77.0.
`knn_top1` here is DINOv2's protocol (k=20, T=0.07, full train set as the memory bank); `linear_top1`
is a miniature of its linear eval (frozen CLS [+ mean patch] features, no augmentation, small lr
sweep), so it reads a little below the published linear numbers.

Recipe: multi-crop 2 x 224 (scale 0.32-1) + 8 x 98 (0.05-0.32; the reference's 96 px are 6 x 6 patches
of 16, 98 px are 7 x 7 patches of 14), Gaussian blur with the paper's probabilities (global 1.0 / 0.1,
local 0.5; the released code effectively uses 0 / 0.9 / 0.5: data.crops.released_code_blur=True
reproduces that, lvm_jax/data/multicrop.py); DINO + iBOT (shared head, 65536
prototypes, masks on half the global crops, ratio 0.1-0.5) + KoLeo 0.1; centering (the default
config; the ViT-L/14 recipe uses Sinkhorn-Knopp); teacher momentum 0.992 -> 1, temperature 0.04 ->
0.07 over 30 epochs; AdamW lr 4e-3 * sqrt(2048 / 1024) with 10 warmup epochs, cosine to 1e-6;
weight decay 0.04 -> 0.4; layer decay 0.9; patch-embed lr x 0.2; clip 3.0 per submodule; prototypes
frozen for the first epoch; LayerScale 1e-5; uniform drop-path 0.1 (the yaml's 0.3 is sized for
ViT-L; 0.1 is DINO's ViT-S rate).
"""

import math

import ml_collections

EPOCH = 1250  # DINOv2's OFFICIAL_EPOCH_LENGTH: its schedules count "epochs" of 1250 steps


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.task = "dinov2"
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(
        variant="S/14", image_size=224, pool="cls", class_token=True, num_registers=0, pos_embed="learned",
        pos_embed_interp="dinov2", layerscale_init=1e-5, ffn="mlp", drop_path_rate=0.1, drop_path_uniform=True,
        use_mask_token=True, dtype="bfloat16", param_dtype="float32", attention_impl="auto", remat="none",
        scan_layers=True,
    ))
    c.head = ml_collections.ConfigDict(dict(
        num_prototypes=65536, hidden_dim=2048, bottleneck_dim=256, num_layers=3,
        separate_ibot_head=False, ibot_num_prototypes=65536, ibot_hidden_dim=2048, ibot_bottleneck_dim=256,
        ibot_num_layers=3,
        learn_prototype_gain=True,  # DINOv2 trains the weight norm's gain (weight_g)
    ))
    c.dino = ml_collections.ConfigDict(dict(
        loss_weight=1.0, student_temp=0.1, centering="centering", center_momentum=0.9, sinkhorn_iterations=3,
        koleo_loss_weight=0.1, koleo_num_groups=0,
    ))
    c.ibot = ml_collections.ConfigDict(dict(loss_weight=1.0, mask_ratio=(0.1, 0.5), mask_probability=0.5))
    c.teacher = ml_collections.ConfigDict(dict(
        momentum=0.992, final_momentum=1.0, warmup_temp=0.04, temp=0.07, temp_warmup_steps=30 * EPOCH))

    c.data = ml_collections.ConfigDict(dict(
        source="tfds", name="imagenet2012", path="", train_split="train", eval_split="validation",
        image_size=224, eval_resize_ratio=0.875, worker_count=16, eval_worker_count=8, prefetch=2, read_threads=16, decode_errors="skip",
        crops=ml_collections.ConfigDict(dict(
            global_size=224, local_size=98, num_local_crops=8, global_scale=(0.32, 1.0),
            local_scale=(0.05, 0.32), released_code_blur=False)),
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.batch_size = 2048
    c.eval_batch_size = 1024
    c.total_steps = 100 * EPOCH

    c.optim = ml_collections.ConfigDict(dict(
        lr=4e-3 * math.sqrt(2048 / 1024), min_lr=1e-6, warmup_steps=10 * EPOCH, weight_decay=0.04,
        weight_decay_end=0.4, b1=0.9, b2=0.999, eps=1e-8, clip_norm=3.0, layer_decay=0.9,
        patch_embed_lr_mult=0.2, freeze_last_layer_steps=1 * EPOCH,
    ))
    c.eval = ml_collections.ConfigDict(dict(
        train_subset=0,  # 0: the whole train split is the k-NN memory bank, as DINOv2's eval
        knn_ks=(10, 20, 100), knn_temperature=0.07, linear_probe=True, linear_epochs=10, pictures=4,
    ))
    c.log_every = 100
    c.eval_every = 10 * EPOCH  # the reference evaluates every 12500 steps
    c.ckpt_every = 2 * EPOCH
    c.keep_checkpoints = 3
    c.compile_cache_dir = ""  # XLA compile cache: "" = WORKDIR/compile_cache, a path, or "none"
    c.init_from = ""
    return c
