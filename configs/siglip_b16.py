"""SigLIP ViT-B/16 (sigmoid loss) from scratch on web image-text pairs (webdataset shards).

Command:   lvm-train --config configs/siglip_b16.py --workdir gs://bucket/siglip_b16 \
             --config.data.path='/data/datacomp1b/{00000000..00139999}.tar' \
             --config.data.eval_path='/data/datacomp-heldout/{00000..00001}.tar' \
             --config.evals.classnames_file=/data/imagenet_classnames.txt
Hardware:  TPU v4-256 / 32 x 8 H100 (global batch 32768). The sigmoid loss needs no global
           softmax: --config.ring_loss=True passes text blocks around the devices so no chip ever
           holds more than a [B_local, B_local] block of logits (useful at very large batches).
Time:      300k steps = 9.8B samples seen; the SigLIP paper finds a 32k batch sufficient.
Reference (ImageNet-1k zero-shot top-1, open_clip's CLIP_benchmark table):
           SigLIP ViT-B/16, 224 px, WebLI (big_vision release)   76.0%
           SigLIP ViT-B/16, 256 px, WebLI                         76.5%
           WebLI is not public: on LAION / DataComp expect numbers nearer the CLIP B/16 ones in
           configs/clip_b16.py. The release uses a 32k SentencePiece vocabulary; this config uses
           CLIP's BPE vocabulary (tokenizer.path).

Recipe: sigmoid loss over every image-text pair of the global batch with a learnable temperature
t' = ln 10 and bias b = -10 at init (the ~B^2 negatives then start with a small loss), t not clamped
(big_vision never clamps it; released SigLIP checkpoints end near exp(t) = 112, above CLIP's 100);
MAP-pooled image tower whose output is the image embedding (no image projection) and a text
projection with a bias, as big_vision's two towers; bidirectional text tower pooled at the last
position (captions padded with EOT, as big_vision pads, so that position is EOT for every caption),
64 tokens, images scaled to
[-1, 1]; AdamW with b2 = 0.95 (the SigLIP paper's fix for loss spikes at large batch), warmup + cosine.
Everything not set here is configs/clip_b16.py (data, evals, mesh).
"""

import math
import pathlib

from lvm_jax.config import load_config_file


def get_config(arg=None):
    del arg
    c = load_config_file(str(pathlib.Path(__file__).with_name("clip_b16.py")))

    c.model.embed_dim = 768
    c.model.init_logit_scale = math.log(10.0)
    c.model.init_logit_bias = -10.0
    c.model.image_projection = False  # embed_dim == the image width: the MAP head's output is the embedding
    c.model.projection_bias = True
    c.model.vision.update(dict(pool="map", class_token=False, pre_norm=False, patch_bias=True, norm_eps=1e-6))
    c.model.text.update(dict(context_length=64, width=768, depth=12, num_heads=12, causal=False, pool="last",
                             norm_eps=1e-6))
    c.loss = "sigmoid"
    c.ring_loss = False
    c.max_logit_scale = None  # big_vision's SigLIP leaves t unclamped

    c.data.mean = (0.5, 0.5, 0.5)
    c.data.std = (0.5, 0.5, 0.5)
    c.data.rrc_scale = None  # plain resize to 224, as the SigLIP input pipeline does

    c.batch_size = 32768
    c.total_steps = 300_000
    c.optim.update(dict(lr=1e-3, b2=0.95, eps=1e-6, weight_decay=0.1, warmup_steps=5000, clip_norm=1.0))
    return c
