"""CLIP ViT-B/16 from scratch on web image-text pairs (LAION / DataComp webdataset shards).

Command:   lvm-train --config configs/clip_b16.py --workdir gs://bucket/clip_b16 \
             --config.data.path='gs://bucket/laion2b/{00000..99999}.tar' \
             --config.data.eval_path='gs://bucket/laion2b-heldout/{00000..00001}.tar' \
             --config.evals.classnames_file=/data/imagenet_classnames.txt
           (zero-shot reads TFDS imagenet2012 prepared locally; --config.evals.zeroshot_data.source=folder
           --config.evals.zeroshot_data.path=/data/imagenet reads root/{train,val}/<class>/ instead)
           Shards in a bucket are read with one ranged GET per image: raise --config.data.read_threads
           (records in flight per host, default 16) if the input pipeline cannot keep up.
Hardware:  TPU v4-256 / 32 x 8 H100 (global batch 32768, 128 per chip); on fewer chips keep the
           batch and raise --config.optim.grad_accum (GradCache: the contrastive batch stays 32768).
Time:      ~390k steps = 12.8B samples seen (OpenAI CLIP's 32 epochs of 400M pairs).
Reference (ImageNet-1k zero-shot top-1, open_clip's CLIP_benchmark table):
           OpenAI ViT-B/16 (WIT-400M, 12.8B samples seen)            68.3%
           open_clip ViT-B/16 laion2b_s34b_b88k (34B seen, batch 88k) 70.2%
           open_clip ViT-B/16 datacomp_xl_s13b_b90k (13B seen)       73.5%
           open_clip ViT-B/32 laion2b_s34b_b79k                       66.6%
           These use the 80 OpenAI ImageNet prompt templates (set evals.templates_file to them);
           the default below is OpenAI's smaller 7-template ensemble.

Recipe (OpenAI CLIP / open_clip): AdamW lr 5e-4, b2 0.98, eps 1e-6, weight decay 0.2 on >= 2-D
kernels only, 2000 warmup steps then cosine to 0, learnable temperature (init 1/0.07, clamped to
100), CLIP BPE tokenizer (49408 ids, context 77), bf16 compute with f32 params.
Variants:
  --config.model.vision.patch_dropout=0.5         FLIP-style: half the patches, ~2x faster steps
  --config.lit.lock_image=True --config.init_from=W_pretrained_vit     LiT with a pretrained tower
"""

import math

import ml_collections

# OpenAI's 7-template ImageNet ensemble (from their prompt-engineering notebook).
IMAGENET_TEMPLATES_7 = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_vocab_path() -> str:
    """CLIP's bpe_simple_vocab_16e6.txt.gz if this checkout or open_clip has it, else '' (set tokenizer.path)."""
    try:
        from lvm_jax.data.tokenizer import default_vocab_path

        return default_vocab_path()
    except (ImportError, ValueError):
        return ""


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.task = "clip"
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(
        embed_dim=512, init_logit_scale=math.log(1 / 0.07), init_logit_bias=None,
        dtype="bfloat16", param_dtype="float32",
        vision=ml_collections.ConfigDict(dict(
            variant="B/16", image_size=224, pool="cls", class_token=True, pre_norm=True, patch_bias=False,
            norm_eps=1e-5, patch_dropout=0.0, drop_path_rate=0.0,
            attention_impl="auto", remat="none", scan_layers=True)),
        text=ml_collections.ConfigDict(dict(
            vocab_size=None, context_length=77, width=512, depth=12, num_heads=8, causal=True, pool="eot",
            attention_impl="auto", remat="none", scan_layers=True)),
    ))
    c.loss = "softmax"
    c.ring_loss = False
    c.max_logit_scale = math.log(100.0)
    c.lit = ml_collections.ConfigDict(dict(lock_image=False, unlocked_blocks=0))
    c.tokenizer = ml_collections.ConfigDict(dict(
        path=clip_vocab_path(), train_vocab_size=0, train_max_captions=0, pad_vocab_to=64))

    c.data = ml_collections.ConfigDict(dict(
        source="webdataset", path="/data/laion2b/{00000..99999}.tar",
        eval_path="/data/laion2b-heldout/{00000..00001}.tar",  # retrieval eval: a few held-out shards
        index_dir="", name="", train_split="train", eval_split="validation",
        image_size=224, worker_count=16, prefetch=2, read_threads=16, decode_errors="skip",
        rrc_scale=(0.9, 1.0), hflip=False,  # open_clip's train crop; no flips (captions say "left")
        eval_resize_ratio=1.0,  # resize the short side to 224, centre crop 224
        mean=OPENAI_MEAN, std=OPENAI_STD,
    ))

    c.evals = ml_collections.ConfigDict(dict(
        zeroshot=True, retrieval=True,
        classnames_file="",  # one class name per line, in label order (required for ImageNet)
        templates_file="", templates=IMAGENET_TEMPLATES_7,
        # ImageNet val as a locally prepared TFDS set (its label names are WordNet ids: set classnames_file).
        zeroshot_data=ml_collections.ConfigDict(dict(source="tfds", path="", name="imagenet2012",
                                                     eval_split="validation")),
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.batch_size = 32768
    c.eval_batch_size = 4096
    c.total_steps = 390_000

    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=5e-4, weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6, warmup_steps=2000,
        schedule="cosine", end_lr_factor=0.0, clip_norm=0.0, layer_decay=1.0, grad_accum=1,
    ))
    c.log_every = 100
    c.eval_every = 10_000
    c.ckpt_every = 2_000
    c.keep_checkpoints = 3
    c.compile_cache_dir = ""  # XLA compile cache: "" = WORKDIR/compile_cache, a path, or "none"
    c.init_from = ""
    return c
