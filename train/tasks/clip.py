"""Task `clip`: CLIP / SigLIP image-text contrastive training, LiT, zero-shot and retrieval evals.

One step:
  images `[B, H, W, 3]` + caption tokens `[B, L]` -> both towers (ViT image tower with
  optional patch dropout, causal text tower) -> L2-normalised embeddings -> contrastive
  loss over the *global* batch (`config.loss`: 'softmax' = CLIP, 'sigmoid' = SigLIP; each
  device scores its own rows against all columns, or with `config.ring_loss` the sigmoid
  loss passes text blocks around a ring) -> AdamW (b2 0.98, eps 1e-6 in the configs,
  weight-decay mask, warmup + cosine) -> the log temperature is clamped to
  [0, `config.max_logit_scale`] after every update (open_clip clamps in place after
  `optimizer.step()`; the forward uses exp(logit_scale) unclamped, as open_clip does).

Gradient accumulation (`config.optim.grad_accum = k`) keeps the contrastive batch global
the way GradCache (Gao et al. 2021) does, which gives the same gradient as open_clip's
`--accum-freq` feature caching:
  1. embed all k micro-batches without gradients -> features of the whole batch `[B, D]`;
  2. loss over the whole batch and its gradient w.r.t. the features (and temperature/bias);
  3. per micro-batch, re-run the towers under `jax.vjp` and pull that micro-batch's
     feature gradient back to the parameters; sum over micro-batches.
By the chain rule this is exactly the big-batch gradient (every negative of the full
batch is seen), at the cost of a second forward; peak activation memory is one
micro-batch's. Plain per-micro-batch gradient averaging (train/tasks/common.py) is NOT
equivalent: each micro-batch would only see its own B/k negatives. Both passes use the
same dropout/patch-dropout key per micro-batch, so the recomputed forward is identical.

LiT (`config.lit.lock_image`): the image tower and its projection get no update (the
optimizer zeroes them) and, when fully locked, no backward pass either (stop_gradient).
`config.lit.unlocked_blocks = N` unlocks the last N encoder blocks and everything after
them (final norm, pooling head, image projection), open_clip's `lock_image_tower(N + 1)`.
Load the pretrained tower with `config.init_from`: an lvm_jax `clip` / `supervised` run's
workdir, or a converted checkpoint (`lvm-convert`: timm, open_clip, DINOv2, big_vision ...).

Tokenizer (built once per task): `config.tokenizer.path` loads a vocabulary file (CLIP's
bpe_simple_vocab_16e6.txt.gz or a tokenizer.json, or SigLIP's SentencePiece `.model` for a
converted SigLIP text tower: ids, sticky EOS, EOS padding, with text.pool='last'); otherwise
a fresh BPE vocabulary of `config.tokenizer.train_vocab_size` is trained on the training
captions (deterministic, so a resumed run or `lvm-eval` rebuilds the same ids). The text
tower's vocabulary is padded up to a multiple of `config.tokenizer.pad_vocab_to` so it shards
evenly.

Evals (`evaluate`): zero-shot classification (`zeroshot_top1`, `zeroshot_top5`,
`zeroshot_mean_per_class_recall`) on a labelled split with class names x prompt
templates (synthetic data: `ZEROSHOT_TEMPLATES`, which never occur in its training
captions), and retrieval recall (`i2t_r1/5/10`, `t2i_r1/5/10`) on the eval split's
captions, several captions of one image grouped by its key.
"""

from __future__ import annotations

import pathlib
import re
import sys
from typing import Any

import flax.linen as nn
import grain.python as grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from lvm_jax import data as lvm_data
from lvm_jax import sharding
from lvm_jax.data import synthetic as synthetic_data
from lvm_jax.data import transforms as T
from lvm_jax.data.captions import build_captions_source, build_webdataset_source
from lvm_jax.data.sentencepiece_tokenizer import SentencePieceTokenizer
from lvm_jax.data.tokenizer import ClipTokenizer, train_bpe
from lvm_jax.errors import UserError
from lvm_jax.evals import retrieval, zeroshot
from lvm_jax.models import ViT
from lvm_jax.models.clip import CLIP, DEFAULT_VISION, MAX_LOGIT_SCALE, clamp_logit_scale
from lvm_jax.models.text import TextTransformer
from lvm_jax.objectives import contrastive
from lvm_jax.optim import build_optimizer, path_str
from train.state import TrainState
from train.tasks.base import Task
from train.tasks.common import DTYPES, grad_accum_steps

# The image-caption sources live in lvm_jax/data/captions.py under other module names,
# so the by-name auto-import of build_source cannot find them; register them here.
for _name, _factory in (("captions", build_captions_source), ("webdataset", build_webdataset_source)):
    if _name not in lvm_data.SOURCES:
        lvm_data.register_source(_name, _factory)

LOSSES = ("softmax", "sigmoid")
Tokenizer = ClipTokenizer | SentencePieceTokenizer


# ----------------------------------------------------------------------------- host transforms
class TokenizeCaption(grain.MapTransform):
    """Last host step: record['caption'] -> 'tokens' int32 `[L]`; keeps only `keys` (+ tokens)."""

    def __init__(self, tokenizer: Tokenizer, context_length: int, keys: tuple[str, ...], pad_id: int = 0):
        self.tokenizer, self.context_length, self.keys = tokenizer, int(context_length), tuple(keys)
        self.pad_id = int(pad_id)

    def map(self, record: dict[str, Any]) -> dict[str, Any]:
        out = {k: record[k] for k in self.keys if k in record}
        if "id" in out:
            out["id"] = np.int32(out["id"])
        if "caption" in record:
            out["tokens"] = self.tokenizer([record["caption"]], self.context_length, self.pad_id)[0]
        return out


class CaptionWordDropout(grain.RandomMapTransform):
    """Training-time text augmentation: drops each word of record['caption'] with probability `p`.

    Words are whitespace-separated; at least one word always survives (a random one when all
    were drawn). Trains the text tower on partial descriptions (e.g. just the shape and a
    colour) as well as full captions, so short prompts that name one attribute land where
    the images with that attribute are. p=0 is the identity.
    """

    def __init__(self, p: float):
        if not 0.0 <= p < 1.0:
            raise UserError(f"config.data.caption_word_dropout={p} must be in [0, 1); 0 turns it off.")
        self.p = float(p)

    def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        words = record["caption"].split()
        if self.p == 0.0 or len(words) < 2:
            return record
        keep = rng.random(len(words)) >= self.p
        if not keep.any():
            keep[rng.integers(len(words))] = True
        return {**record, "caption": " ".join(w for w, k in zip(words, keep) if k)}


def image_transforms(data_cfg: ml_collections.ConfigDict, train: bool) -> list[grain.Transformation]:
    """decode -> (random-resized crop | resize) or (resize + centre crop) -> normalise.

    No horizontal flip unless `data.hflip`: captions may name sides ("upper left").
    Output records keep image float32 `[S, S, 3]`, label, caption and id.
    """
    get = data_cfg.get
    size = int(get("image_size", 224) or 224)
    synthetic = (get("source", "synthetic") or "synthetic") == "synthetic"
    interpolation = get("interpolation", "bicubic")
    ops: list[grain.Transformation] = []
    if not synthetic:
        ops += [T.DecodeImage(get("decode_errors", "skip") or "skip"), T.DropFailed()]
    rrc_scale = get("rrc_scale", None)
    if train and rrc_scale is not None:
        ops.append(T.RandomResizedCrop(size, rrc_scale, get("rrc_ratio", None) or (3 / 4, 4 / 3), interpolation))
    elif train or synthetic:
        ops.append(T.Resize(size, interpolation))
    else:
        ops.append(T.ResizeCenterCrop(size, get("eval_resize_ratio", 1.0) or 1.0, interpolation))
    if train and get("hflip", False):
        ops.append(T.RandomHorizontalFlip())
    ops.append(T.Normalize(get("mean", None) or T.IMAGENET_MEAN, get("std", None) or T.IMAGENET_STD,
                           keys=("image", "label", "caption", "id")))
    return ops


# ----------------------------------------------------------------------------- tokenizer
def source_captions(source: Any, limit: int) -> list[str]:
    """Up to `limit` training captions of `source`, in index order (for training a BPE vocabulary)."""
    if isinstance(source, synthetic_data.SyntheticShapes):
        # Captions are a function of the scene parameters: no need to render the images.
        scenes = synthetic_data.sample_scenes(np.arange(min(len(source), limit)), source.seed, source.split,
                                              source.num_classes, source.difficulty)
        return [synthetic_data.caption(scenes, i) for i in range(len(scenes["index"]))]
    captions = getattr(source, "captions", None)
    if captions is None:
        raise UserError(f"Cannot train a tokenizer on {source!r}: it exposes no captions; set "
                        "config.tokenizer.path to a vocabulary file (e.g. bpe_simple_vocab_16e6.txt.gz).")
    return list(captions[:limit])


def build_tokenizer(tok_cfg: ml_collections.ConfigDict, train_source: Any) -> Tokenizer:
    """The vocabulary file at `tok_cfg.path` (CLIP BPE, a tokenizer.json, or a SentencePiece `.model`
    for SigLIP checkpoints), else a BPE vocabulary trained on the training captions."""
    path = tok_cfg.get("path", "")
    if path and str(path).endswith(".model"):
        return SentencePieceTokenizer.from_file(path)
    if path:
        return ClipTokenizer.from_file(path)
    vocab_size = int(tok_cfg.get("train_vocab_size", 0) or 0)
    if vocab_size <= 0:
        raise UserError("Set config.tokenizer.path to a vocabulary file or config.tokenizer.train_vocab_size "
                        "(e.g. 1024) to train one on the captions.")
    return train_bpe(source_captions(train_source, int(tok_cfg.get("train_max_captions", 100_000))), vocab_size)


# ----------------------------------------------------------------------------- LiT
def lit_frozen(lit_cfg: ml_collections.ConfigDict, depth: int, scan_layers: bool):
    """`path -> frozen?` for LiT, or None when nothing is locked.

    Locked: everything under image_tower/ and image_proj/, except (unlocked_blocks = N > 0)
    encoder blocks depth-N..depth-1 and the tower parts after the encoder.
    """
    if not lit_cfg or not lit_cfg.get("lock_image", False):
        return None
    unlocked = int(lit_cfg.get("unlocked_blocks", 0) or 0)
    if not 0 <= unlocked <= depth:
        raise UserError(f"config.lit.unlocked_blocks={unlocked} is outside [0, {depth}] (the image tower's depth).")
    if unlocked and scan_layers:
        raise UserError("config.lit.unlocked_blocks needs per-block parameters; set "
                        "config.model.vision.scan_layers=False.")
    first_unlocked = depth - unlocked

    def frozen(path: str) -> bool:
        if path.startswith("image_proj/"):
            return unlocked == 0
        if not path.startswith("image_tower/"):
            return False
        if unlocked == 0:
            return True
        rest = path[len("image_tower/"):]
        block = re.match(r"encoder/blocks_(\d+)/", rest)
        if block:
            return int(block.group(1)) < first_unlocked
        # Before the encoder (patch/pos embeddings, tokens, ln_pre) stays locked; after it unlocks.
        return not re.match(r"(norm|map_head|fc_norm|pre_logits)(/|$)", rest)

    return frozen


# ----------------------------------------------------------------------------- the task
class ClipTask(Task):
    name = "clip"

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
        super().__init__(config, mesh)
        self.total_steps = int(config.get("total_steps") or 1)
        self.loss_kind = config.get("loss", "softmax")
        if self.loss_kind not in LOSSES:
            raise UserError(f"config.loss={self.loss_kind!r} is unknown; use 'softmax' (CLIP) or 'sigmoid' (SigLIP).")
        self.ring = bool(config.get("ring_loss", False))
        if self.ring and self.loss_kind != "sigmoid":
            raise UserError("config.ring_loss=True needs config.loss='sigmoid'; the ring is a SigLIP loss.")
        self.grad_accum = grad_accum_steps(config, mesh)
        if self.loss_kind == "sigmoid" and config.model.get("init_logit_bias", None) is None:
            raise UserError("config.loss='sigmoid' needs a learnable logit bias; set config.model.init_logit_bias "
                            "(SigLIP: -10, with config.model.init_logit_scale=2.302585, i.e. ln 10).")
        self.frozen()  # validates config.lit early
        max_scale = config.get("max_logit_scale", MAX_LOGIT_SCALE)
        self.max_logit_scale = None if max_scale is None else float(max_scale)
        self._train_source = None
        self._tokenizer = None
        self._model = None
        self._tx = None
        self._eval_cache: dict[str, Any] = {}

    # --- data ---------------------------------------------------------------------------------
    def train_source(self):
        if self._train_source is None:
            self._train_source = lvm_data.build_source(self.config.data, split="train")
        return self._train_source

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            tok_cfg = self.config.get("tokenizer", ml_collections.ConfigDict())
            self._tokenizer = build_tokenizer(tok_cfg, None if tok_cfg.get("path", "") else self.train_source())
        return self._tokenizer

    @property
    def context_length(self) -> int:
        text = self.config.model.get("text", None) or {}
        return int(text.get("context_length", None) or TextTransformer.context_length)

    @property
    def pad_id(self) -> int:
        """The token after EOT. A text tower pooled at the last position reads the same token
        (EOT) for every caption only if the padding is EOT, as big_vision pads for SigLIP; a
        zero pad would pool the embedding of '!' (id 0 in CLIP's BPE). Otherwise 0 (open_clip)."""
        text = self.config.model.get("text", None) or {}
        if isinstance(self.tokenizer, SentencePieceTokenizer) and text.get("pool", "eot") == "eot":
            # 'eot' pools at argmax(ids): CLIP's EOT is its largest id, a SentencePiece EOS (1) is not.
            raise UserError("config.model.text.pool='eot' needs CLIP's BPE vocabulary (EOT is its largest id); "
                            "with a SentencePiece tokenizer use pool='last' (SigLIP) or 'map'.")
        if text.get("pool", "eot") != "last":
            return int(text.get("pad_id", 0))
        if text.get("pad_mask", False):
            raise UserError("config.model.text.pad_mask masks id pad_id, but pool='last' pads with EOT; "
                            "set pad_mask=False (big_vision's SigLIP attends to the padding) or pool='eot'.")
        return self.tokenizer.eot_token_id

    def train_transforms(self) -> list:
        word_dropout = float(self.config.data.get("caption_word_dropout", 0.0) or 0.0)
        text_aug = [CaptionWordDropout(word_dropout)] if word_dropout else []
        return image_transforms(self.config.data, train=True) + text_aug + [
            TokenizeCaption(self.tokenizer, self.context_length, keys=("image",), pad_id=self.pad_id)]

    def eval_transforms(self, data_cfg: ml_collections.ConfigDict) -> list:
        return image_transforms(data_cfg, train=False) + [
            TokenizeCaption(self.tokenizer, self.context_length, keys=("image", "label", "id"),
                            pad_id=self.pad_id)]

    # --- model and state ----------------------------------------------------------------------
    @property
    def model(self) -> CLIP:
        if self._model is None:
            self._model = build_clip(self.config.model, self.tokenizer.vocab_size,
                                     int(self.config.get("tokenizer", {}).get("pad_vocab_to", 64) or 1))
        return self._model

    def frozen(self):
        """LiT's `path -> frozen?` (None when nothing is locked); checks config.lit against the tower."""
        vision = {**DEFAULT_VISION, **dict(self.config.model.get("vision", None) or {})}
        vit = ViT(**{k: v for k, v in vision.items() if k in ViT.__dataclass_fields__ and k != "dtype"})
        try:
            depth = vit.dims()[1]
        except ValueError as e:
            raise UserError(f"config.model.vision: {e}") from None
        return lit_frozen(self.config.get("lit", None), depth, bool(vision.get("scan_layers", False)))

    @property
    def image_tower_locked(self) -> bool:
        lit = self.config.get("lit", None)
        return bool(lit and lit.get("lock_image", False) and not int(lit.get("unlocked_blocks", 0) or 0))

    def init_state(self, rng: jax.Array) -> TrainState:
        size = int(self.config.data.image_size)
        init_rng, state_rng = jax.random.split(rng)
        images = jnp.zeros((1, size, size, 3), jnp.float32)
        tokens = jnp.zeros((1, self.context_length), jnp.int32)
        params = self.model.init(init_rng, images, tokens)["params"]
        if self.max_logit_scale is not None:
            params = clamp_logit_scale(params, self.max_logit_scale)
        return TrainState.create(params=params, tx=self.optimizer(params), rng=state_rng)

    def optimizer(self, params: Any) -> optax.GradientTransformation:
        # Cached so the abstract and the concrete state share one (static) tx object.
        if self._tx is None:
            self._tx, self.schedule = build_optimizer(self.config.optim, self.total_steps, nn.meta.unbox(params),
                                                      frozen=self.frozen())
        return self._tx

    def load_pretrained(self, state: TrainState, path: str) -> TrainState:
        """`config.init_from`: an lvm_jax training run (workdir or W/checkpoints/<step>) of a `clip` or
        `supervised` task gives its image tower (+ projection), e.g. for LiT; anything else is a
        converted checkpoint (timm, open_clip, DINOv2, ...; see `Task.load_pretrained`)."""
        step_dir = training_checkpoint(path)
        if step_dir is None:
            return super().load_pretrained(state, path)
        image = load_image_tower(step_dir)
        params = dict(state.params)
        params["image_tower"] = _copy_matching(params["image_tower"], image["image_tower"], "image_tower", path)
        if "image_proj" in image:
            params["image_proj"] = _copy_matching(params["image_proj"], image["image_proj"], "image_proj", path)
        return state.replace(params=params)

    # --- step ---------------------------------------------------------------------------------
    def embed(self, params: Any, images: jax.Array, tokens: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        """L2-normalised image and text embeddings `[b, E]` in train mode (dropout / patch dropout)."""
        out = self.model.apply({"params": params}, images, tokens, train=True, rngs={"dropout": rng})
        image = contrastive.l2_normalize(out["image"])
        if self.image_tower_locked:  # LiT: no gradient can reach the tower, so skip its backward pass
            image = jax.lax.stop_gradient(image)
        return image, contrastive.l2_normalize(out["text"])

    def contrastive_loss(self, image: jax.Array, text: jax.Array, log_scale: jax.Array,
                         bias: jax.Array | None) -> jax.Array:
        """The configured loss over the global batch; `image`, `text` `[B, E]` normalised."""
        scale = jnp.exp(log_scale)
        if self.loss_kind == "softmax":
            return contrastive.sharded_softmax_contrastive_loss(image, text, scale, self.mesh)
        fn = contrastive.ring_sigmoid_contrastive_loss if self.ring else contrastive.sharded_sigmoid_contrastive_loss
        return fn(image, text, scale, bias, self.mesh)

    def loss_and_grads(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Any]:
        """(loss, grads) of the contrastive loss over the whole batch, in `grad_accum` micro-batches."""
        k = self.grad_accum

        def head(image, text, log_scale, bias):
            return self.contrastive_loss(image, text, log_scale, bias)

        if k == 1:
            def loss_fn(p):
                image, text = self.embed(p, batch["image"], batch["tokens"], jax.random.fold_in(rng, 0))
                return head(image, text, p["logit_scale"], p.get("logit_bias"))

            return jax.value_and_grad(loss_fn)(params)

        # GradCache (see the module docstring): features first, then per-micro-batch VJPs.
        size = batch["image"].shape[0]
        split = lambda x: jnp.swapaxes(x.reshape((size // k, k) + x.shape[1:]), 0, 1)  # noqa: E731  [k, B/k, ...]
        merge = lambda x: jnp.swapaxes(x, 0, 1).reshape((size,) + x.shape[2:])  # noqa: E731  inverse of split
        micro = {"image": split(batch["image"]), "tokens": split(batch["tokens"]),
                 "index": jnp.arange(k, dtype=jnp.int32)}

        def features(p, mb):
            return self.embed(p, mb["image"], mb["tokens"], jax.random.fold_in(rng, mb["index"]))

        _, (image, text) = jax.lax.scan(lambda c, mb: (c, features(params, mb)), None, micro)
        bias = params.get("logit_bias")
        loss, (g_image, g_text, g_scale, g_bias) = jax.value_and_grad(head, argnums=(0, 1, 2, 3))(
            merge(image), merge(text), params["logit_scale"], bias)

        def backward(acc, xs):
            mb, gi, gt = xs
            _, pullback = jax.vjp(lambda p: features(p, mb), params)
            (g,) = pullback((gi, gt))
            return jax.tree_util.tree_map(jnp.add, acc, g), None

        grads, _ = jax.lax.scan(backward, jax.tree_util.tree_map(jnp.zeros_like, params),
                                (micro, split(g_image), split(g_text)))
        grads = dict(grads)
        grads["logit_scale"] = grads["logit_scale"] + g_scale
        if bias is not None:
            grads["logit_bias"] = grads["logit_bias"] + g_bias
        return loss, grads

    def clamp(self, params: Any) -> Any:
        return params if self.max_logit_scale is None else clamp_logit_scale(params, self.max_logit_scale)

    def train_step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        loss, grads = self.loss_and_grads(state.params, batch, state.step_rng())
        new_state = state.apply_gradients(grads)
        new_state = new_state.replace(params=self.clamp(new_state.params))
        metrics = {"loss": loss, "lr": self.schedule(state.step), "grad_norm": optax.tree.norm(grads),
                   "logit_scale": jnp.exp(new_state.params["logit_scale"])}
        if "logit_bias" in new_state.params:
            metrics["logit_bias"] = new_state.params["logit_bias"]
        return new_state, metrics

    # --- eval ---------------------------------------------------------------------------------
    def _eval_fn(self):
        if "fn" not in self._eval_cache:
            model = self.model

            def fn(params, batch):
                out = {"image": contrastive.l2_normalize(
                    model.apply({"params": params}, batch["image"], method="encode_image"))}
                if "tokens" in batch:
                    out["text"] = contrastive.l2_normalize(
                        model.apply({"params": params}, batch["tokens"], method="encode_text"))
                return out

            # Replicated outputs: every process can read all embeddings (multi-host evals).
            self._eval_cache["fn"] = jax.jit(fn, out_shardings=sharding.replicated(self.mesh))
        return self._eval_cache["fn"]

    def embed_source(self, params: Any, source: Any, data_cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
        """One pass over `source`: normalised 'image' (and 'text') embeddings, 'label', 'id' of the kept rows."""
        fn = self._eval_fn()
        parts: dict[str, list[np.ndarray]] = {}
        with sharding.mesh_context(self.mesh):
            for batch in self.eval_batches(source, self.eval_transforms(data_cfg)):
                out = jax.device_get(fn(params, {k: v for k, v in batch.items() if k in ("image", "tokens")}))
                valid = sharding.to_host(batch["valid"])
                for key in ("label", "id"):
                    if key in batch:
                        out[key] = sharding.to_host(batch[key])
                for key, value in out.items():
                    parts.setdefault(key, []).append(np.asarray(value)[valid])
        return {k: np.concatenate(v) for k, v in parts.items()}

    def eval_sources(self) -> tuple[Any, ml_collections.ConfigDict, Any, ml_collections.ConfigDict]:
        """(eval split, its data config, zero-shot split or None, its data config)."""
        if "sources" not in self._eval_cache:
            data_cfg = self.config.data
            eval_source = lvm_data.build_source(data_cfg, split="eval")
            evals = self.config.get("evals", ml_collections.ConfigDict())
            zs_overrides = {k: v for k, v in dict(evals.get("zeroshot_data", None) or {}).items() if v}
            if zs_overrides:  # a separate labelled set (e.g. ImageNet val) with the eval image settings
                zs_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
                for key, value in zs_overrides.items():
                    zs_cfg[key] = value
                zs_cfg.eval_path = ""
                zs_source = lvm_data.build_source(zs_cfg, split="eval")
            else:
                zs_cfg, zs_source = data_cfg, None
            self._eval_cache["sources"] = (eval_source, data_cfg, zs_source, zs_cfg)
        return self._eval_cache["sources"]

    def zeroshot_classifier(self, params: Any, source: Any) -> np.ndarray:
        """Class weights `[C, E]` from class names x templates (config.evals or the source's own)."""
        evals = self.config.get("evals", ml_collections.ConfigDict())
        names_file = evals.get("classnames_file", "")
        classnames = (zeroshot.load_classnames(names_file) if names_file
                      else list(getattr(source, "class_names", None) or []))
        if not classnames:
            raise UserError("Zero-shot evaluation needs class names; set config.evals.classnames_file "
                            "(one name per line, in label order).")
        templates_file = evals.get("templates_file", "")
        templates = (zeroshot.load_templates(templates_file) if templates_file
                     else list(evals.get("templates", None) or getattr(source, "zeroshot_templates", None)
                               or zeroshot.DEFAULT_TEMPLATES))
        if "text_fn" not in self._eval_cache:
            model = self.model
            self._eval_cache["text_fn"] = lambda p, t: model.apply({"params": p}, t, method="encode_text")
        encode = lambda prompts: retrieval.embed_arrays(  # noqa: E731
            self._eval_cache["text_fn"], params, self.tokenizer(prompts, self.context_length, self.pad_id),
            self.mesh,            int(self.config.get("eval_batch_size", self.config.batch_size)))
        return zeroshot.build_zeroshot_weights(encode, classnames, templates)

    def evaluate(self, state: TrainState, step: int) -> dict[str, float]:
        del step
        evals = self.config.get("evals", ml_collections.ConfigDict())
        eval_source, data_cfg, zs_source, zs_cfg = self.eval_sources()
        results: dict[str, float] = {}
        embeds = self.embed_source(state.params, eval_source, data_cfg)

        if evals.get("retrieval", True) and "text" in embeds:
            keys = getattr(eval_source, "image_keys", None)
            keys = list(embeds["id"]) if keys is None else [keys[i] for i in embeds["id"]]
            first_rows, text_to_image = retrieval.group_captions_by_image(keys)
            results.update(retrieval.retrieval_metrics(embeds["image"][first_rows], embeds["text"], text_to_image))

        if evals.get("zeroshot", True):
            if zs_source is not None:
                zs_embeds, labelled = self.embed_source(state.params, zs_source, zs_cfg), zs_source
            else:
                zs_embeds, labelled = embeds, eval_source
            if "label" in zs_embeds:
                weights = self.zeroshot_classifier(state.params, labelled)
                if weights.shape[0] <= int(zs_embeds["label"].max()):
                    raise UserError(f"The zero-shot set has labels up to {int(zs_embeds['label'].max())} but only "
                                    f"{weights.shape[0]} class names; fix config.evals.classnames_file.")
                results.update(zeroshot.zeroshot_metrics(zs_embeds["image"], zs_embeds["label"], weights))
            elif not self._eval_cache.get("warned"):
                self._eval_cache["warned"] = True
                print("note: the eval split has no labels, so zero-shot classification is skipped; set "
                      "config.evals.zeroshot_data (e.g. source='folder', path=<ImageNet val>).", file=sys.stderr)
        return results


def build_clip(model_cfg: ml_collections.ConfigDict, vocab_size: int, pad_vocab_to: int = 64) -> CLIP:
    """CLIP from `config.model`; text.vocab_size None -> the tokenizer's, padded to a multiple of `pad_vocab_to`.

    Padding keeps the 'vocab' axis divisible by the tensor-parallel size; the extra rows
    are never looked up (ids stay below the tokenizer's size, EOT the largest).
    """
    cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    vision, text = dict(cfg.get("vision") or {}), dict(cfg.get("text") or {})
    for name, fields, part in (("vision", ViT.__dataclass_fields__, vision),
                               ("text", TextTransformer.__dataclass_fields__, text)):
        unknown = set(part) - (set(fields) - {"parent", "name"})
        if unknown:
            raise UserError(f"config.model.{name} has fields the {name} tower does not know: {sorted(unknown)}.")
        for key in ("dtype", "param_dtype"):
            if isinstance(part.get(key), str):
                part[key] = DTYPES[part[key]]
        for key, value in part.items():
            if isinstance(value, list):
                part[key] = tuple(value)
    if not text.get("vocab_size"):
        text["vocab_size"] = -(-vocab_size // pad_vocab_to) * pad_vocab_to
    elif text["vocab_size"] < vocab_size:
        raise UserError(f"config.model.text.vocab_size={text['vocab_size']} is smaller than the tokenizer's "
                        f"{vocab_size} ids; set it to None to take the tokenizer's size.")
    if text.get("pool") == "first" and text.get("causal", True):
        # Under the causal mask the first token attends only to itself (SOT): every caption would pool
        # to one vector and the text tower could learn nothing. (A converted open_clip model may be
        # built that way; training one is refused.)
        raise UserError("config.model.text.pool='first' with a causal text tower gives every caption the same "
                        "embedding; use pool='eot' (or 'last'), or set config.model.text.causal=False.")
    cfg["vision"], cfg["text"] = vision, text
    for key in ("dtype", "param_dtype"):
        if isinstance(cfg.get(key), str):
            if cfg[key] not in DTYPES:
                raise UserError(f"config.model.{key}={cfg[key]!r} is unknown; use one of {sorted(DTYPES)}.")
    try:
        return CLIP.from_config(cfg)
    except ValueError as e:
        raise UserError(str(e)) from None


def training_checkpoint(path: str) -> pathlib.Path | None:
    """The newest `<step>/` dir of an lvm_jax training run at `path` (workdir, its checkpoints/, or a step dir)."""
    root = pathlib.Path(path)
    if (root / "state").is_dir():
        return root
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
    steps = [s for s in steps if (root / str(s) / "state").is_dir()]
    return root / str(steps[-1]) if steps else None


def load_image_tower(step_dir: pathlib.Path) -> dict[str, Any]:
    """{'image_tower': params[, 'image_proj': params]} of an lvm_jax `clip` or `supervised` checkpoint."""
    import orbax.checkpoint as ocp

    params = ocp.StandardCheckpointer().restore((step_dir / "state").absolute())["params"]
    if "image_tower" in params:
        return {k: params[k] for k in ("image_tower", "image_proj") if k in params}
    # A supervised ViT: the tower is everything but the classifier head.
    return {"image_tower": {k: v for k, v in params.items() if k not in ("head", "pre_logits")}}


def _copy_matching(target: Any, source: Any, what: str, path: str) -> Any:
    """`target` with every leaf replaced by the same-path leaf of `source` (same shape, target's sharding)."""
    flat_source = {path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(source)}

    def copy(p, leaf):
        name = path_str(p)
        if name not in flat_source:
            raise UserError(f"config.init_from={path!r} has no {what}/{name}; its image tower is a different "
                            "architecture (check config.model.vision).")
        value = np.asarray(flat_source[name])
        if value.shape != leaf.shape:
            raise UserError(f"config.init_from={path!r}: {what}/{name} has shape {value.shape}, the model "
                            f"expects {leaf.shape}; match config.model.vision to the pretrained tower.")
        return jax.device_put(value.astype(leaf.dtype), leaf.sharding)

    return jax.tree_util.tree_map_with_path(copy, target)
