"""Zero-shot classification with a text-built classifier (CLIP_benchmark conventions).

Each class's weight vector is the mean of the L2-normalised text embeddings of
its prompts (class name x templates), renormalised. An image's prediction is
the class with the highest cosine similarity. Metrics (fractions in [0, 1]):
`zeroshot_top1`, `zeroshot_top5`, `zeroshot_mean_per_class_recall` (the mean
over classes present in the labels of their top-1 recall, sklearn's balanced accuracy).

Templates are strings with '{c}' (CLIP_benchmark) or '{}' (OpenAI's notebooks)
where the class name goes, or callables `classname -> prompt` (open_clip).
Custom data: `load_classnames(path)`, `load_templates(path)` read one entry per
line (or a JSON list).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from lvm_jax.data import files
from lvm_jax.evals.retrieval import best_positive_rank, embed_arrays, l2_normalize  # noqa: F401 (embed_arrays re-exported)

Template = str | Callable[[str], str]
DEFAULT_TEMPLATES = ("a photo of a {c}.",)


def format_prompt(template: Template, classname: str) -> str:
    """'a photo of a {c}.' / 'a photo of a {}.' / callable -> prompt for `classname`."""
    if callable(template):
        return template(classname)
    if "{c}" in template:
        return template.replace("{c}", classname)
    if "{}" in template:
        return template.replace("{}", classname)
    raise ValueError(f"Template {template!r} has no '{{c}}' or '{{}}' placeholder for the class name; add one.")


def _read_list(path: str | os.PathLike, what: str) -> list[str]:
    path = os.fspath(path)
    if not files.isfile(path):  # a local file or a gs:// object
        raise ValueError(f"{what} file {path!r} does not exist; write one {what[:-1]} per line.")
    text = files.read_bytes(path).decode("utf-8")
    if path.endswith(".json"):
        items = json.loads(text)
        if isinstance(items, dict):  # {"0": "cat", "1": "dog"}: order by integer key
            items = [items[k] for k in sorted(items, key=int)]
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ValueError(f"{path!r} must hold a JSON list of strings (or an index -> name object).")
    else:
        items = [line.strip() for line in text.splitlines() if line.strip()]
    if not items:
        raise ValueError(f"{what} file {path!r} is empty; write one {what[:-1]} per line.")
    return items


def load_classnames(path: str | os.PathLike) -> list[str]:
    """Class names in label order: one per line (.txt) or a JSON list / index->name object (.json)."""
    return _read_list(path, "class names")


def load_templates(path: str | os.PathLike) -> list[str]:
    """Prompt templates, one per line (.txt) or a JSON list; each needs a '{c}' or '{}' placeholder."""
    templates = _read_list(path, "templates")
    for t in templates:
        format_prompt(t, "x")  # raises on a template without a placeholder
    return templates


def zeroshot_weights(text_embeds: np.ndarray) -> np.ndarray:
    """Prompt embeddings `[C, T, D]` -> class weights `[C, D]`: normalise, mean over T, renormalise."""
    text_embeds = np.asarray(text_embeds, np.float32)
    if text_embeds.ndim != 3:
        raise ValueError(f"zeroshot_weights needs [classes, templates, D] embeddings, got {text_embeds.shape}.")
    return l2_normalize(l2_normalize(text_embeds).mean(axis=1))


def build_zeroshot_weights(encode_texts: Callable[[list[str]], np.ndarray], classnames: Sequence[str],
                           templates: Sequence[Template] = DEFAULT_TEMPLATES) -> np.ndarray:
    """Class weights `[C, D]` from class names x templates.

    Args:
      encode_texts: list of C*T prompts -> `[C*T, D]` embeddings, e.g. tokenizer + `embed_arrays`.
    """
    if not classnames or not templates:
        raise ValueError("build_zeroshot_weights needs at least one class name and one template.")
    prompts = [format_prompt(t, c) for c in classnames for t in templates]
    embeds = np.asarray(encode_texts(prompts))
    if len(embeds) != len(prompts):
        raise ValueError(f"encode_texts returned {len(embeds)} embeddings for {len(prompts)} prompts.")
    return zeroshot_weights(embeds.reshape(len(classnames), len(templates), -1))


def zeroshot_metrics(image_embeds: np.ndarray, labels: Sequence[int], class_weights: np.ndarray,
                     chunk_size: int = 4096) -> dict[str, float]:
    """Top-1/top-5 accuracy and mean per-class recall of the zero-shot classifier.

    Args:
      image_embeds: `[N, D]` (normalised here); labels: int `[N]` in [0, C).
      class_weights: `[C, D]` from `zeroshot_weights` / `build_zeroshot_weights`.
    """
    images, weights = l2_normalize(image_embeds), l2_normalize(class_weights)
    labels = np.asarray(labels, np.int64)
    if images.ndim != 2 or weights.ndim != 2 or images.shape[1] != weights.shape[1]:
        raise ValueError(f"zeroshot_metrics needs [N, D] images and [C, D] class weights of one width, got "
                         f"{images.shape} and {weights.shape}.")
    if labels.shape != (len(images),) or len(images) == 0:
        raise ValueError(f"zeroshot_metrics needs one label per image ({len(images)}), got shape {labels.shape}.")
    if labels.min() < 0 or labels.max() >= len(weights):
        raise ValueError(f"Labels must lie in [0, {len(weights)}) to match the {len(weights)} class names.")
    rank = np.empty(len(images), np.int64)
    for start in range(0, len(images), chunk_size):
        logits = images[start:start + chunk_size] @ weights.T
        is_label = np.arange(len(weights)) == labels[start:start + chunk_size, None]
        rank[start:start + chunk_size] = best_positive_rank(logits, is_label)
    present = np.unique(labels)
    recalls = [np.mean(rank[labels == c] < 1) for c in present]  # rank 0 == argmax is the label
    return {"zeroshot_top1": float(np.mean(rank < 1)), "zeroshot_top5": float(np.mean(rank < 5)),
            "zeroshot_mean_per_class_recall": float(np.mean(recalls))}
