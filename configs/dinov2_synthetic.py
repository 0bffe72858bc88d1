"""DINOv2 on the embedded synthetic shapes data set — the self-supervised default job, no downloads.

Command:   lvm-train --config configs/dinov2_synthetic.py --workdir runs/dinov2_synthetic
Hardware:  2 CPU cores (any host); also runs unchanged on any GPU/TPU mesh.
Time:      9 min 31 s wall on 2 quiet CPU cores (2026-11-27 session 9, /usr/bin/time, 188% CPU, peak
           RSS 2.0 GB; compile, 3 evals with the linear probe and the pictures included; ~220 img/s).
Goal:      knn_top1 (k=20, T=0.07, teacher CLS, 10 shape classes, the whole 20k-image train split as the
           memory bank, 5000 eval images) >= 0.2 above step 0 at the end, no collapse (monitors in
           metrics.jsonl, see train/tasks/dinov2.py).
Measured:  MET (session 9, 2026-11-27, final code of the session), no collapse: knn_top1 0.123 (step 0) ->
           0.355 (900) -> 0.351 (1800), +22.8 points; linear_top1 0.223 -> 0.396 -> 0.402. Monitors
           from step 150 on: teacher_entropy >= 3.79 (floor 1.0), teacher / student feature std >=
           0.975 / 0.958 (floor 0.1); teacher_row_entropy 1.01-3.82: one uniform-teacher warning at
           step 150, the first step checked (3.82 vs the ceiling 0.9 ln 64 = 3.74; 3.44 at 175), the
           ~200-step uniform start every run of this recipe has, not a collapse.
           The same recipe before the head-major attention residuals of session 9 (other last-bit
           rounding): seed 0 +21.3 / +21.3 (GELU recompute / autodiff); seed 1 +22.4 / +21.6; seed 2
           +19.5 / +16.8 (below the goal).
           On the 2-core AVX2 host (AMD EPYC, session 11, 2026-11-28, commit 7c74a13): MET, +23.1 points,
           knn_top1 0.123 -> 0.326 (900) -> 0.354 (1800), linear_top1 0.223 -> 0.383 -> 0.387, teacher_entropy
           >= 3.82, feature std >= 0.958 from step 150 on. Wall time there is NOT within 15 min: ~0.95 s/step
           alone (about 30 min for the run; measured 61.7 min while a CI run shared the 2 cores).
Margin:    THIN. The standard error of one accuracy is ~0.7 points, and runs that differ only in seed
           or last-bit float rounding spread widely: over the six runs above mean +20.5, sd 2.0, 2 of 6
           below +20. The session-6 recipe (a shared iBOT head, 1400 steps) is no better: mean +20.4,
           sd 1.0, 2 of 6 below, the shipped seed 0 among them under LVM_JAX_GELU=recompute (now the CPU
           default; +19.4). Every run and probe, and why the recipe deviates where it does:
           docs/dinov2_synthetic.md.

Every ingredient of the DINOv2 recipe is on (multi-crop, DINO + iBOT + KoLeo, Sinkhorn-Knopp, EMA
teacher, LayerScale, uniform drop-path, registers, layer-wise lr decay, patch-embed lr multiplier,
per-submodule clipping, frozen prototypes early), scaled down to 32 px images: global crops 32, local
crops 16, a 2-block hybrid ViT with 8 px tokens, 64 prototypes. Deviations from the published recipe,
each measured (docs/dinov2_synthetic.md): teacher temperature 0.02 (the recipe's 0.04 -> 0.07 collapses
to the uniform output here), LayerScale 0.1 and teacher momentum 0.95 -> 1 (1e-5 and 0.992 keep an
all-identical teacher for ~100 steps), iBOT loss weight 2 with a separate iBOT head, 1800 steps, 64
prototypes, lr 2e-3, 10 local crops, no solarisation.

Train on your own images (labels are used only by the kNN / linear evals):
  lvm-train --config configs/dinov2_synthetic.py --workdir W --config.data.source=folder --config.data.path=/data/pets
"""

import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.task = "dinov2"
    c.seed = 0

    # Student and teacher backbone (lvm_jax.models.ViT fields).
    c.model = ml_collections.ConfigDict(dict(
        variant=None, width=128, depth=2, num_heads=4, mlp_dim=384, patch_size=8,
        image_size=32,  # the learned pos-emb grid: the global crop size (local crops interpolate)
        pool="cls", class_token=True, num_registers=1, pos_embed="learned", pos_embed_interp="dinov2",
        layerscale_init=0.1, ffn="mlp", drop_path_rate=0.1, drop_path_uniform=True, use_mask_token=True,
        # issue 2's hybrid stem (as configs/vit_synthetic.py): 3 stride-2 3x3 convs with instance norm, 8 px tokens
        stem="conv", stem_widths=(32, 64, 128), stem_norm="instance",
        dtype="float32", param_dtype="float32", attention_impl="xla", remat="none", scan_layers=False,
    ))
    # DINO / iBOT heads (lvm_jax.models.heads.DINOiBOTHeads fields).
    c.head = ml_collections.ConfigDict(dict(
        num_prototypes=64, hidden_dim=512, bottleneck_dim=128, num_layers=3,  # 64: docs/dinov2_synthetic.md
        # A separate iBOT head (DINOv2's default shares one): with 1800 steps it clears +20 under both
        # float roundings of the GELU and both seeds tried; the shared head fails under one
        # (docs/dinov2_synthetic.md).
        separate_ibot_head=True, ibot_num_prototypes=64, ibot_hidden_dim=512, ibot_bottleneck_dim=128,
        ibot_num_layers=3,
        # Prototype gain fixed to 1 (DINO v1's norm_last_layer): every number in docs/dinov2_synthetic.md
        # was measured so. DINOv2 trains it (the recipe configs); not yet measured on this data set.
        learn_prototype_gain=False,
    ))
    c.dino = ml_collections.ConfigDict(dict(
        loss_weight=1.0, student_temp=0.1,
        centering="sinkhorn_knopp",  # or 'centering' (EMA centre, momentum center_momentum)
        center_momentum=0.9, sinkhorn_iterations=3,
        koleo_loss_weight=0.1, koleo_num_groups=0,  # 0: per data-parallel slice, as the reference per GPU
    ))
    # iBOT weight 2 (the recipe: 1): with the shared head at 1400 steps +21.3 / +21.2 k-NN points
    # (seeds 0 / 1) vs +19.8 / +17.7 (docs/dinov2_synthetic.md).
    c.ibot = ml_collections.ConfigDict(dict(loss_weight=2.0, mask_ratio=(0.1, 0.5), mask_probability=0.5))
    c.teacher = ml_collections.ConfigDict(dict(
        momentum=0.95, final_momentum=1.0, warmup_temp=0.02, temp=0.02, temp_warmup_steps=150))

    c.data = ml_collections.ConfigDict(dict(
        source="synthetic", path="", name="", train_split="train", eval_split="validation",
        image_size=32,  # eval resolution
        worker_count=0, prefetch=2, read_threads=8, decode_errors="skip", eval_resize_ratio=1.0,
        crops=ml_collections.ConfigDict(dict(
            global_size=32, local_size=16, num_local_crops=10, global_scale=(0.32, 1.0),  # 10: +16.4 vs +13.9 (6)
            local_scale=(0.05, 0.32), released_code_blur=False,
            blur_p=(1.0, 0.1, 0.5), blur_sigma=(0.1, 2.0),  # the paper's (global 1, global 2, local) and sigma
            # The recipe's colour jitter and greyscale; no solarisation (measured without it).
            jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2, solarize_p=0.0)),
        synthetic=ml_collections.ConfigDict(dict(
            # 5000 eval images: the k-NN accuracy's standard error is ~0.7 points (~1.5 with 1000)
            num_train=20000, num_eval=5000, seed=0, image_size=32, num_classes=10,
            # Training records as V renderings of each shape in new scenes (crop k from view k mod V;
            # 0: one image per record). Evals always use one rendering per image.
            views=0, view_nuisances=("color", "background", "position", "clutter", "noise"),
            # Probability that a view re-draws each listed group: (start, end), ramped linearly over the
            # view_redraw_ramp fractions of total_steps (a curriculum; start == end: constant).
            view_redraw_p=(1.0, 1.0), view_redraw_ramp=(0.0, 1.0))),
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.batch_size = 64
    c.eval_batch_size = 256
    c.total_steps = 1800

    c.optim = ml_collections.ConfigDict(dict(
        lr=2e-3, min_lr=1e-6, warmup_steps=50, weight_decay=0.04, weight_decay_end=0.4,
        b1=0.9, b2=0.999, eps=1e-8, clip_norm=3.0, layer_decay=0.9, patch_embed_lr_mult=0.2,
        freeze_last_layer_steps=30,
    ))
    c.eval = ml_collections.ConfigDict(dict(
        train_subset=0,  # 0: the whole train split is the k-NN memory bank (DINOv2's protocol; was 5000)
        knn_ks=(10, 20, 100), knn_temperature=0.07, linear_probe=True, linear_epochs=50,
        pictures=4,
    ))
    c.log_every = 25
    c.eval_every = 900
    c.ckpt_every = 900
    c.keep_checkpoints = 2
    c.compile_cache_dir = ""  # XLA compile cache: "" = WORKDIR/compile_cache, a path, or "none"
    c.init_from = ""
    return c
