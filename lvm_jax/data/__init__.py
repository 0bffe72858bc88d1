"""Host-side data: sources, per-record transforms and grain loaders.

    src = build_source(data_cfg, split="train")
    ops = supervised_transforms(data_cfg, train=True)
    loader = make_loader(src, ops, batch_size=per_process_batch, shuffle=True, seed=0,
                         shard_index=jax.process_index(), shard_count=jax.process_count())
    batch = next(iter(loader))  # image float32 [b, H, W, 3], label int32 [b]
"""
from lvm_jax.data.pipeline import ShardedSource, benchmark_loader, loader_options, make_loader
from lvm_jax.data.sources import (SOURCES, ImageFolder, SyntheticShapes, TfdsSource,
                                  build_source, register_source)
from lvm_jax.data.synthetic import CAPTION_TEMPLATES, CLASS_NAMES, ZEROSHOT_TEMPLATES, Difficulty
from lvm_jax.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, decode_failures,
                                     supervised_transforms)

__all__ = [
    "CAPTION_TEMPLATES", "CLASS_NAMES", "Difficulty", "IMAGENET_MEAN", "IMAGENET_STD", "ImageFolder",
    "SOURCES", "ShardedSource", "SyntheticShapes", "TfdsSource", "ZEROSHOT_TEMPLATES",
    "benchmark_loader", "build_source", "decode_failures", "loader_options", "make_loader", "register_source",
    "supervised_transforms",
]
