"""DINOv2-style curation on the embedded synthetic shapes -- no files, no downloads.

Command:   lvm-curate run --config configs/curate_synthetic.py --out runs/curate_synthetic
Then:      lvm-train --config configs/vit_synthetic.py --workdir runs/vit_on_manifest \
             --config.data.source=manifest --config.data.path=runs/curate_synthetic
Hardware:  2 CPU cores (any host); unchanged on a GPU/TPU mesh or several hosts.
Time:      about 3 minutes on 2 cores (2 of them training the backbone briefly).
Expected:  the 150 exact pool copies of other pool images and the 60 pool copies of
           reference (eval) images are removed; >= 90% of the retrieved images show
           one of the 5 curated shape classes (the pool holds all 10).

Sets:
  curated     400 images of 5 shape classes (circle .. cross), synthetic seed 0.
  pool        3000 images of all 10 classes (seed 1), plus exact copies of 150 of
              them (planted self-duplicates) and of 60 reference images (planted
              reference duplicates): 3210 images.
  references  the curated classes' eval split (300 images): relative dedup target.

Backbone: the small ViT of configs/vit_synthetic.py, briefly trained (300 steps) on a
separate labelled synthetic split of all 10 classes by lvm-train into OUT/backbone --
a stand-in for the self-supervised ViT the DINOv2 paper retrieves with.  Point
config.backbone.params at any lvm-train workdir (or a .npz/.safetensors params file)
to use other weights; set config.backbone.train_config='' for a random init.

Dedup thresholds: the paper's 0.6 / 0.45 are calibrated for copy-detection features
(SSCD).  A briefly trained supervised classifier maps *different* images of one class
close together, so here near-duplicate means cosine > 0.95 (self) and > 0.9
(reference); exact copies have cosine 1.
"""

import ml_collections


def _synthetic(seed, num, num_classes, split="train", image_size=32):
    return ml_collections.ConfigDict(dict(
        source="synthetic", split=split, image_size=image_size,
        synthetic=ml_collections.ConfigDict(dict(
            num_train=num, num_eval=num, seed=seed, image_size=image_size, num_classes=num_classes)),
    ))


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.out = "runs/curate_synthetic"

    c.curated = _synthetic(seed=0, num=400, num_classes=5)
    # A list concatenates: base pool, then planted exact copies.
    c.pool = [
        _synthetic(seed=1, num=3000, num_classes=10),
        _synthetic(seed=1, num=150, num_classes=10),               # = pool images 0..149
        _synthetic(seed=0, num=60, num_classes=5, split="eval"),   # = reference images 0..59
    ]
    c.references = [_synthetic(seed=0, num=300, num_classes=5, split="eval")]

    c.model = ml_collections.ConfigDict(dict(
        variant=None, width=128, depth=4, num_heads=4, mlp_dim=384, patch_size=4, image_size=32,
        pool="gap", class_token=False, pos_embed="learned", dtype="float32", param_dtype="float32",
        attention_impl="xla", remat="none", scan_layers=False,
    ))
    c.backbone = ml_collections.ConfigDict(dict(
        params="",                                  # lvm-train workdir or params file; wins if set
        train_config="configs/vit_synthetic.py",    # else: train briefly with lvm-train
        train_overrides=("total_steps=300", "eval_every=300", "ckpt_every=300", "log_every=50",
                         "data.synthetic.seed=7", "data.synthetic.num_train=6000",
                         "data.synthetic.num_eval=500"),
        seed=0,                                     # random init when neither is set
    ))
    c.embed = ml_collections.ConfigDict(dict(
        batch_size=128, shard_size=1024, image_size=32, crop_pct=1.0, feature="pooled", workers=4,
    ))
    c.curation = ml_collections.ConfigDict(dict(
        dedup=dict(enabled=True, threshold=0.95, k=64, reference_threshold=0.9),
        retrieval=dict(mode="sample", k=4),
        index=dict(kind="auto"),
    ))
    return c
