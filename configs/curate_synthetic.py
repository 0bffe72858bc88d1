"""DINOv2-style curation on the embedded synthetic shapes -- no files, no downloads.

Command:   lvm-curate run --config configs/curate_synthetic.py --out runs/curate_synthetic
Then:      lvm-train --config configs/vit_synthetic.py --workdir runs/vit_on_manifest \
             --config.data.source=manifest --config.data.path=runs/curate_synthetic
Hardware:  2 CPU cores (any host); unchanged on a GPU/TPU mesh or several hosts.
Time:      the backbone is the project's default job (configs/vit_synthetic.py, 1200 steps,
           ~14 CPU-minutes; 32 min wall on 2 heavily shared cores); embedding + curation
           then take ~30 s.  Reuse a trained backbone: --config.backbone.params=WORKDIR.
Expected (measured with that backbone, eval top1 0.41 on the current synthetic data):
           all 150 planted pool copies and all 60 pool copies of reference images are
           removed (plus 16 and 1 near-identical images); 1093 images retrieved for 400
           curated ones, 62% of them of the 5 curated classes (the pool is half those
           classes) -- retrieval is only as good as the backbone's features.

Sets:
  curated     400 images of 5 shape classes (circle .. cross), synthetic seed 0.
  pool        3000 images of all 10 classes (seed 1), plus exact copies of 150 of
              them (planted self-duplicates) and of 60 reference images (planted
              reference duplicates): 3210 images.
  references  the curated classes' eval split (300 images): relative dedup target.

Backbone: the ViT of configs/vit_synthetic.py trained by lvm-train into OUT/backbone on
a separate labelled synthetic split of all 10 classes (seed 7) -- a stand-in for the
self-supervised ViT the DINOv2 paper retrieves with; the run resumes it if interrupted.
Point config.backbone.params at any lvm-train workdir (or a .npz/.safetensors params
file) to use other weights; set config.backbone.train_config='' for a random init.

Dedup thresholds: the paper's 0.6 / 0.45 are calibrated for copy-detection features
(SSCD).  A supervised classifier maps *different* images close together (here the
99.9th percentile of cosine between images of different classes is 0.94), so in this
demo near-duplicate means cosine > 0.99 for both; exact copies have cosine 1.
"""

import ml_collections

from lvm_jax.curation.pipeline import default_config as curation_defaults


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
        train_overrides=("data.synthetic.seed=7",),   # the default job, on other images
        seed=0,                                     # random init when neither is set
    ))
    c.embed = ml_collections.ConfigDict(dict(
        batch_size=128, shard_size=1024, image_size=32, crop_pct=1.0, feature="pooled", workers=4,
    ))
    # Every curation knob (dedup, retrieval, index, report), overridable on the command line,
    # e.g. --config.curation.retrieval.mode=cluster --config.curation.index.nprobe=64.
    c.curation = curation_defaults()
    c.curation.dedup.threshold = 0.99
    c.curation.dedup.reference_threshold = 0.99
    return c
