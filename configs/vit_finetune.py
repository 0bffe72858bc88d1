"""Fine-tune a pretrained ViT (converted with lvm-convert) on your own labelled images.

Command:
  lvm-convert /path/to/timm/vit_base_patch16_224.augreg2_in21k_ft_in1k ckpt/vit_b16   # once, see README
  lvm-train --config configs/vit_finetune.py --workdir runs/ft \
    --config.init_from=ckpt/vit_b16 --config.data.source=folder --config.data.path=/data/pets
Hardware:  one GPU/TPU host (batch 512 at 224 px fits a 16 GB accelerator in bf16 with remat='dots').
Time:      minutes per epoch on a small data set (Oxford-IIIT Pets: ~3.7k images/epoch).
Expected:  ~93-94% top-1 on Pets from an ImageNet-21k ViT-B/16 in 10 epochs (typical transfer numbers in the
           ViT / big_vision transfer papers); the head is re-initialised for your number of classes.

Recipe (big_vision transfer style): SGD-like small lr with AdamW 3e-5..1e-4, short warmup, cosine, weight
decay 0.05 on every kernel (the new head's too; biases, norms, tokens and position embeddings are not
decayed), layer-wise lr decay 0.75, label smoothing 0.1, grad clip 1.0.
"""

import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.task = "supervised"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        variant="B/16", image_size=224, num_classes=None, pool="cls", class_token=True, pos_embed="learned",
        head_zero_init=True, drop_path_rate=0.1, dtype="bfloat16", param_dtype="float32",
        attention_impl="auto", remat="dots", scan_layers=False,
    ))
    c.data = ml_collections.ConfigDict(dict(
        source="folder", name="", path="", train_split="train", eval_split="validation",
        image_size=224, worker_count=8, prefetch=4, read_threads=16, decode_errors="skip",
        rrc_scale=(0.25, 1.0), rrc_ratio=(3 / 4, 4 / 3), hflip=True, randaugment=None, eval_resize_ratio=0.875,
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),  # timm augreg / big_vision ViTs are trained with [-1, 1] inputs
        synthetic=ml_collections.ConfigDict(dict(num_train=20000, num_eval=2000, seed=0, image_size=224,
                                                 num_classes=10)),
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.batch_size = 512
    c.eval_batch_size = 512
    c.total_steps = 0
    c.total_epochs = 10
    c.label_smoothing = 0.1
    c.mixup_alpha = 0.0
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-4, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=100,
        schedule="cosine", end_lr_factor=0.0, clip_norm=1.0, layer_decay=0.75, grad_accum=1,
    ))
    c.log_every = 20
    c.eval_every = 200
    c.ckpt_every = 200
    c.keep_checkpoints = 2
    c.compile_cache_dir = ""  # XLA compile cache: "" = WORKDIR/compile_cache, a path, or "none"
    c.init_from = ""  # an lvm-convert output directory (required for fine-tuning)
    return c
