"""Task `dinov2`: self-distillation with no labels (DINO + iBOT + KoLeo, EMA teacher).

One step, as facebookresearch/dinov2 `SSLMetaArch.forward_backward` + `train.py`:
  teacher (EMA backbone + heads, no gradient) on the 2 global crops -> CLS
  logits and masked-patch logits -> targets by centring or Sinkhorn-Knopp at
  the scheduled teacher temperature; student (backbone with iBOT mask tokens
  on the global crops, plain on the local crops, uniform drop-path) -> DINO
  loss on every (student crop, other teacher global crop) pair, iBOT loss on
  the masked patches, KoLeo on the student's global backbone CLS tokens;
  AdamW with per-submodule gradient clipping, layer-wise lr decay, patch-embed
  lr multiplier, cosine weight decay and a frozen prototype layer for the
  first steps; then the teacher moves towards the student (momentum cosine
  0.992 -> 1) and the centres towards the teacher's batch mean.

Host side (`train_transforms`): multi-crop per record, then the iBOT masks of
that record from the same per-record generator (grain's, a function of seed
and position in the stream, so masks are reproduced exactly after a resume).
Each sample masks `int(2 * mask_probability)` of its global crops (1 of 2 in
the recipe) with a ratio uniform in `mask_ratio`; its masked-token indices
are padded to the fixed bound `int(N * mask_ratio[1])`, so every batch has the
same shapes and the jitted step compiles once. (The reference draws
`int(2B * p)` masked crops per per-GPU batch of B images, stratifies their
ratios, and shuffles them over all 2B global crops: about a quarter of its
images have both crops masked and a quarter neither. Here every image has
exactly one masked crop. Each crop row has the same marginal, masked with
probability p at a ratio uniform in `mask_ratio`, the statistics do not
depend on the per-host batch size, and every gather stays on the device that
holds the sample.)
With `data.synthetic.views = V` (synthetic source only) a training record is V
renderings of one shape in different scenes (`SyntheticViews`) and crop k is
cut from view k mod V; the kNN / linear evals still use one rendering per image.
With `view_redraw_p = (start, end)` the re-draw probability ramps with the
training step (`ScheduledViews`, a curriculum): the views are rendered by the
first host transform from the record's stream position, so a resumed run
renders the same views.

State: `params = {'backbone', 'heads'}` (the student); `extra = {'teacher':
same structure, 'dino_center' [K], 'ibot_center' [K_ibot]}` (centres stay 0
under Sinkhorn-Knopp). The teacher shares the student's shardings (FSDP etc.).

Collapse monitors (train metrics, every `log_every` steps):
  teacher_entropy      entropy (nats) of the batch-mean teacher softmax over
                       prototypes: ~0 when every image picks the same prototype.
                       Floor: >= 1.0 (e^1 ~ 3 prototypes effectively in use).
  teacher_row_entropy  mean per-image teacher entropy; -> log K means a
                       uniform (featureless) teacher. Ceiling: <= 0.9 log K.
  student_feature_std / teacher_feature_std
                       per-dimension std over the batch of the L2-normalised
                       backbone CLS features, times sqrt(D): ~1 for features
                       spread over the sphere, 0 when all images map to one
                       point. Floor: >= 0.1.
Evals (`evaluate`, step 0 included): weighted kNN (`knn_top1`: k = 20, T =
0.07) and a linear probe (`linear_top1`) on the teacher backbone's CLS
(+ mean patch) features of the labelled eval split, against a fixed random
subset of the labelled train split; at the last step the last-layer CLS
attention and patch-PCA pictures go to `workdir/plots/`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import grain.python as grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh

from lvm_jax import data as lvm_data
from lvm_jax import schedules, sharding
from lvm_jax.data.masking import MaskCollator
from lvm_jax.data.multicrop import MultiCrop, MultiCropTransform
from lvm_jax.data.synthetic import DEFAULT_VIEW_NUISANCES, VIEW_NUISANCES, SyntheticViews, render_views
from lvm_jax.data.transforms import DecodeImage, DropFailed
from lvm_jax.errors import UserError
from lvm_jax.evals.knn import extract_features, knn_classifier
from lvm_jax.evals.linear_probe import linear_probe
from lvm_jax.models import ViT
from lvm_jax.models.heads import DINOiBOTHeads
from lvm_jax.objectives import dino
from lvm_jax.optim import layer_decay_multiplier, path_str
from train.state import TrainState
from train.tasks.base import Task
from train.tasks.common import DTYPES, build_vit

CENTERINGS = ("sinkhorn_knopp", "centering")
# The collapse monitors' documented bounds (module docstring), checked by `health_warnings`.
ROW_ENTROPY_CEILING = 0.9  # x ln K
ENTROPY_FLOOR = 1.0
FEATURE_STD_FLOOR = 0.1


class Dinov2Task(Task):
    name = "dinov2"

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
        super().__init__(config, mesh)
        self.total_steps = int(config.get("total_steps") or 1)
        self._eval_cache: dict[str, Any] = {}
        self._validate()

    # --- config checks: one clear sentence each, before any data or compile ----------------------
    def _validate(self) -> None:
        c = self.config
        crops = c.data.crops
        if int(crops.local_size) > int(crops.global_size):
            raise UserError(
                f"config.data.crops.local_size={crops.local_size} is larger than config.data.crops.global_size="
                f"{crops.global_size}; local crops must be the smaller views (e.g. 96 with 224, 16 with 32).")
        patch = self.backbone.dims()[4]
        for key in ("global_size", "local_size"):
            if int(crops[key]) % patch[0] or int(crops[key]) % patch[1]:
                raise UserError(f"config.data.crops.{key}={crops[key]} is not a multiple of the patch size "
                                f"{patch}; pick a crop size the patches tile.")
        lo, hi = (float(x) for x in c.ibot.mask_ratio)
        if not (0.0 <= lo <= hi <= 1.0):
            raise UserError(f"config.ibot.mask_ratio={tuple(c.ibot.mask_ratio)} must be (min, max) fractions "
                            "with 0 <= min <= max <= 1, e.g. (0.1, 0.5).")
        p = float(c.ibot.mask_probability)
        if not 0.0 <= p <= 1.0:
            raise UserError(f"config.ibot.mask_probability={p} is outside [0, 1]; give the fraction of global "
                            "crops to mask, e.g. 0.5.")
        if self.use_ibot and int(2 * p) == 0:
            raise UserError(f"config.ibot.mask_probability={p} masks no global crop (each sample masks "
                            "int(2 * p) of its 2 crops); use >= 0.5 or set config.ibot.loss_weight=0.")
        if self.use_ibot and 2 * p != int(2 * p):
            # Masks are drawn per sample (resumable, independent of the host batch): a fraction of
            # its 2 global crops is a whole number of them, and anything else would be floored.
            raise UserError(f"config.ibot.mask_probability={p} is not a whole number of each sample's 2 global "
                            "crops; use 0.5 (DINOv2's) or 1.0.")
        views = self.synthetic_views
        if views:
            if (c.data.get("source", "synthetic") or "synthetic") != "synthetic":
                raise UserError(f"config.data.synthetic.views={views} re-renders synthetic scenes, but "
                                f"config.data.source={c.data.source!r}; set views=0 for real images.")
            if views < 2:
                raise UserError(f"config.data.synthetic.views={views} must be 0 (one image per sample) or >= 2 "
                                "(renderings of each shape, crop k from view k mod views).")
            unknown = sorted(set(c.data.synthetic.get("view_nuisances", None) or ()) - set(VIEW_NUISANCES))
            if unknown:
                raise UserError(f"config.data.synthetic.view_nuisances has unknown group(s) {unknown}; "
                                f"choose from {sorted(VIEW_NUISANCES)}.")
            raw = c.data.synthetic.get("view_redraw_p", 1.0)
            ps = [float(x) for x in (raw if isinstance(raw, (tuple, list)) else (raw,))]
            if len(ps) not in (1, 2) or not all(0.0 <= x <= 1.0 for x in ps):
                raise UserError(f"config.data.synthetic.view_redraw_p={raw} is not a probability or a (start, end) "
                                "pair of probabilities; use values in [0, 1] (1: every view re-draws every "
                                "listed nuisance).")
            lo, hi = (float(x) for x in c.data.synthetic.get("view_redraw_ramp", (0.0, 1.0)))
            if not 0.0 <= lo <= hi <= 1.0:
                raise UserError(f"config.data.synthetic.view_redraw_ramp={(lo, hi)} must be (begin, end) fractions "
                                "of total_steps with 0 <= begin <= end <= 1, e.g. (0.2, 0.8).")
            if len(ps) == 2 and not self.config.get("total_steps"):
                raise UserError("config.data.synthetic.view_redraw_p=(start, end) ramps over config.total_steps; "
                                "set config.total_steps (not total_epochs).")
        if c.dino.centering not in CENTERINGS:
            raise UserError(f"config.dino.centering={c.dino.centering!r} is unknown; use one of {CENTERINGS}.")
        if float(c.dino.koleo_loss_weight) > 0:
            groups = self.koleo_groups
            if int(c.batch_size) % groups or int(c.batch_size) // groups < 2:
                raise UserError(
                    f"config.batch_size={c.batch_size} gives {int(c.batch_size) // groups} sample(s) per KoLeo group "
                    f"({groups} groups = {'the data-parallel size' if not c.dino.koleo_num_groups else 'config'}); "
                    "KoLeo needs >= 2 to find a nearest neighbour (the reference returns inf): raise the batch "
                    "size, lower config.dino.koleo_num_groups, or set config.dino.koleo_loss_weight=0.")

    # --- models -------------------------------------------------------------------------------------
    @property
    def backbone(self) -> ViT:
        return build_vit(self.config.model, num_classes=None)

    @property
    def heads(self) -> DINOiBOTHeads:
        kwargs = dict(self.config.head.to_dict())
        kwargs["dtype"] = DTYPES[self.config.model.get("dtype", "float32")]
        return DINOiBOTHeads(**kwargs)

    @property
    def use_ibot(self) -> bool:
        return float(self.config.ibot.loss_weight) > 0

    @property
    def koleo_groups(self) -> int:
        # 0 = one group per data-parallel slice: the reference computes KoLeo per GPU.
        return int(self.config.dino.get("koleo_num_groups", 0)) or sharding.data_parallel_size(self.mesh)

    @property
    def grid(self) -> tuple[int, int]:
        patch = self.backbone.dims()[4]
        size = int(self.config.data.crops.global_size)
        return size // patch[0], size // patch[1]

    # --- data ---------------------------------------------------------------------------------------
    @property
    def multicrop(self) -> MultiCrop:
        crops = self.config.data.crops
        # Photometric fields left out of the config keep the recipe's values (MultiCrop's defaults).
        photometric = {k: float(crops[k]) for k in ("jitter_p", "grayscale_p", "solarize_p")
                       if crops.get(k) is not None}
        photometric.update({k: tuple(crops[k]) for k in ("jitter", "blur_p", "blur_sigma")
                            if crops.get(k) is not None})
        return MultiCrop(
            global_size=int(crops.global_size), local_size=int(crops.local_size),
            num_local_crops=int(crops.num_local_crops), global_scale=tuple(crops.global_scale),
            local_scale=tuple(crops.local_scale), released_code_blur=bool(crops.get("released_code_blur", False)),
            mean=tuple(self.config.data.get("mean", None) or lvm_data.IMAGENET_MEAN),
            std=tuple(self.config.data.get("std", None) or lvm_data.IMAGENET_STD), **photometric)

    @property
    def mask_collator(self) -> MaskCollator:
        return MaskCollator(self.grid, mask_ratio=tuple(float(x) for x in self.config.ibot.mask_ratio),
                            mask_probability=float(self.config.ibot.mask_probability), n_global_crops=2)

    @property
    def synthetic_views(self) -> int:
        """`config.data.synthetic.views`: renderings per sample for the multi-crop (0: one image)."""
        syn = self.config.data.get("synthetic", None) or {}
        return int(syn.get("views", 0) or 0)

    @property
    def view_schedule(self) -> ViewRedrawSchedule | None:
        """The re-draw probability by step when `data.synthetic.view_redraw_p` is a (start, end) ramp."""
        syn = self.config.data.get("synthetic", None) or {}
        start, end = _redraw_p_pair(syn.get("view_redraw_p", 1.0))
        if not self.synthetic_views or start == end:
            return None
        lo, hi = (float(x) for x in syn.get("view_redraw_ramp", (0.0, 1.0)))
        total = int(self.config.total_steps)
        return ViewRedrawSchedule(start, end, round(lo * total), round(hi * total))

    def train_source(self):
        """The training records; with `data.synthetic.views` each is several renderings of one shape
        (`SyntheticViews`). With a re-draw ramp the source stays the plain one and the views are
        rendered by the first transform (`ScheduledViews`), which knows each record's step. The evals
        always use the plain source (one rendering per image)."""
        source = lvm_data.build_source(self.config.data, split="train")
        if not self.synthetic_views or self.view_schedule is not None:
            return source
        syn = self.config.data.synthetic
        return SyntheticViews(source, self.synthetic_views, self._view_nuisances,
                              redraw_p=_redraw_p_pair(syn.get("view_redraw_p", 1.0))[0])

    @property
    def _view_nuisances(self) -> tuple[str, ...]:
        nuisances = self.config.data.synthetic.get("view_nuisances", None)
        return tuple(nuisances) if nuisances is not None else DEFAULT_VIEW_NUISANCES

    def train_transforms(self) -> list:
        ops: list = []
        schedule = self.view_schedule
        if schedule is not None:
            ops.append(ScheduledViews(lvm_data.build_source(self.config.data, split="train"), self.synthetic_views,
                                      self._view_nuisances, schedule,
                                      records_per_step=sharding.check_batch_size(int(self.config.batch_size),
                                                                                 self.mesh)))
        if self.config.data.get("source", "synthetic") != "synthetic":
            ops += [DecodeImage(self.config.data.get("decode_errors", "skip") or "skip"), DropFailed()]
        ops.append(MultiCropTransform(self.multicrop))
        if self.use_ibot:
            ops.append(SampleMasks(self.mask_collator))
        return ops

    # --- state --------------------------------------------------------------------------------------
    def init_params(self, rng: jax.Array) -> dict[str, Any]:
        """Boxed `{'backbone', 'heads'}` params."""
        backbone_rng, heads_rng = jax.random.split(rng)
        size = int(self.config.data.crops.global_size)
        backbone = self.backbone.init(backbone_rng, jnp.zeros((1, size, size, 3), jnp.float32))["params"]
        width = self.backbone.dims()[0]
        tokens = jnp.zeros((1, width), jnp.float32)
        heads = self.heads.init(heads_rng, tokens, tokens)["params"]
        return {"backbone": backbone, "heads": heads}

    def init_state(self, rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        params = self.init_params(init_rng)
        head = self.config.head
        ibot_k = int(head.ibot_num_prototypes if head.separate_ibot_head else head.num_prototypes)
        extra = {
            # The teacher starts as a copy of the student (same boxes -> same shardings).
            "teacher": jax.tree_util.tree_map(lambda x: x, params),
            "dino_center": jnp.zeros((int(head.num_prototypes),), jnp.float32),
            "ibot_center": jnp.zeros((ibot_k,), jnp.float32),
        }
        return TrainState.create(params=params, tx=self.optimizer(), rng=state_rng, extra=extra)

    def optimizer(self) -> optax.GradientTransformation:
        # Cached: the abstract and the concrete state must share one (static) tx object.
        if getattr(self, "_tx", None) is None:
            shapes = _strip_boxes(jax.eval_shape(self.init_params, jax.random.PRNGKey(0)))
            self._tx = build_dinov2_optimizer(self.config.optim, self.schedules, shapes,
                                              depth=self.backbone.dims()[1])
        return self._tx

    @property
    def schedules(self) -> dict[str, schedules.WarmupCosine]:
        """lr, last-layer lr, weight decay, teacher momentum and temperature, by step."""
        if getattr(self, "_schedules", None) is None or self._schedules_for != self.total_steps:
            o, t, total = self.config.optim, self.config.teacher, self.total_steps
            warmup, freeze = int(o.warmup_steps), int(o.freeze_last_layer_steps)
            temp_warmup = int(t.temp_warmup_steps)
            for key, value in (("optim.warmup_steps", warmup), ("optim.freeze_last_layer_steps", freeze),
                               ("teacher.temp_warmup_steps", temp_warmup)):
                if value > total:
                    raise UserError(f"config.{key}={value} exceeds total_steps={total}; lower it.")
            self._schedules = {
                "lr": schedules.dinov2_lr(float(o.lr), float(o.min_lr), total, warmup),
                "last_layer_lr": schedules.dinov2_last_layer_lr(float(o.lr), float(o.min_lr), total, warmup, freeze),
                "weight_decay": schedules.dinov2_weight_decay(total, float(o.weight_decay),
                                                              float(o.weight_decay_end)),
                "momentum": schedules.teacher_momentum(total, float(t.momentum), float(t.final_momentum)),
                "teacher_temp": schedules.teacher_temperature(temp_warmup, float(t.warmup_temp), float(t.temp)),
            }
            self._schedules_for = total
        return self._schedules

    # --- step ---------------------------------------------------------------------------------------
    def train_step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        cfg = self.config
        backbone, heads = self.backbone, self.heads
        sched = self.schedules
        teacher_temp = sched["teacher_temp"](state.step)
        student_temp = float(cfg.dino.student_temp)
        global_rng, local_rng = jax.random.split(state.step_rng())

        global_crops = batch["global_crops"]  # [B, 2, G, G, 3]
        b, n_global = global_crops.shape[:2]
        flat_global = global_crops.reshape((b * n_global,) + global_crops.shape[2:])
        local_crops = batch["local_crops"]  # [B, n_l, L, L, 3]
        n_local = local_crops.shape[1]
        if self.use_ibot:
            masks = batch["masks"].reshape(b * n_global, -1)  # [2B, N]
            mask_indices, mask_weights = batch["mask_indices"], batch["mask_weights"]  # [B, U]
        else:
            masks = mask_indices = mask_weights = None

        def per_sample(x):  # [B * n, ...] -> [B, n, ...] (rows are sample-major)
            return x.reshape((b, -1) + x.shape[1:])

        # --- teacher: targets, no gradient ---------------------------------------------------------
        teacher = state.extra["teacher"]  # outside loss_fn: it gets no gradient
        t_out = backbone.apply({"params": teacher["backbone"]}, flat_global)
        t_cls = per_sample(t_out["cls"])  # [B, 2, D]
        t_masked = (dino.gather_masked_tokens(per_sample(t_out["patch_tokens"]), mask_indices)
                    if self.use_ibot else None)
        t_cls_logits, t_patch_logits = heads.apply({"params": teacher["heads"]}, t_cls, t_masked)
        extra_updates = {}
        if cfg.dino.centering == "sinkhorn_knopp":
            iterations = int(cfg.dino.get("sinkhorn_iterations", 3))
            t_cls_probs = dino.sinkhorn_knopp(t_cls_logits, teacher_temp, iterations)
            if self.use_ibot:
                t_patch_probs = dino.sinkhorn_knopp(t_patch_logits, teacher_temp, iterations,
                                                    valid=mask_weights > 0)
        else:
            momentum = float(cfg.dino.center_momentum)
            t_cls_probs = dino.softmax_center_teacher(t_cls_logits, state.extra["dino_center"], teacher_temp)
            extra_updates["dino_center"] = dino.update_center(state.extra["dino_center"], t_cls_logits, momentum)
            if self.use_ibot:
                t_patch_probs = dino.softmax_center_teacher(t_patch_logits, state.extra["ibot_center"],
                                                            teacher_temp)
                extra_updates["ibot_center"] = dino.update_center(
                    state.extra["ibot_center"], t_patch_logits, momentum, valid=mask_weights > 0)

        # --- student: losses and gradients ---------------------------------------------------------
        def loss_fn(params):
            s_out = backbone.apply({"params": params["backbone"]}, flat_global, train=True, mask=masks,
                                   rngs={"dropout": global_rng})
            s_cls = per_sample(s_out["cls"])  # [B, 2, D]
            cls_tokens = s_cls
            if n_local:
                l_out = backbone.apply({"params": params["backbone"]},
                                       local_crops.reshape((b * n_local,) + local_crops.shape[2:]), train=True,
                                       rngs={"dropout": local_rng})
                cls_tokens = jnp.concatenate([s_cls, per_sample(l_out["cls"])], axis=1)
            s_masked = (dino.gather_masked_tokens(per_sample(s_out["patch_tokens"]), mask_indices)
                        if self.use_ibot else None)
            cls_logits, patch_logits = heads.apply({"params": params["heads"]}, cls_tokens, s_masked)
            losses = {"dino_loss": dino.dino_cls_loss(cls_logits[:, :n_global],
                                                      cls_logits[:, n_global:] if n_local else None,
                                                      t_cls_probs, student_temp)}
            loss = float(cfg.dino.loss_weight) * losses["dino_loss"]
            if self.use_ibot:
                losses["ibot_loss"] = dino.ibot_patch_loss(patch_logits, t_patch_probs, mask_weights,
                                                           num_rows=b * n_global, student_temp=student_temp)
                loss = loss + float(cfg.ibot.loss_weight) * losses["ibot_loss"]
            if float(cfg.dino.koleo_loss_weight) > 0:
                losses["koleo_loss"] = dino.koleo_loss(s_cls, num_groups=self.koleo_groups)
                loss = loss + float(cfg.dino.koleo_loss_weight) * losses["koleo_loss"]
            return loss, (losses, s_cls)

        (loss, (losses, s_cls)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads)

        # --- EMA teacher ---------------------------------------------------------------------------
        m = sched["momentum"](state.step)
        new_teacher = jax.tree_util.tree_map(lambda t, s: t * m + s * (1.0 - m), state.extra["teacher"],
                                             new_state.params)
        new_state = new_state.replace(extra={**new_state.extra, **extra_updates, "teacher": new_teacher})

        metrics = {"loss": loss, **losses, "lr": sched["lr"](state.step),
                   "weight_decay": sched["weight_decay"](state.step), "teacher_temp": teacher_temp,
                   "teacher_momentum": m, **_grad_norms(grads),
                   **collapse_monitors(t_cls_logits, teacher_temp, t_cls, s_cls)}
        return new_state, metrics

    def health_warnings(self, step: int, metrics: dict[str, float]) -> list[str]:
        """The collapse monitors against their documented floors/ceiling, once the teacher temperature has warmed up."""
        if step < int(self.config.teacher.temp_warmup_steps) or "teacher_row_entropy" not in metrics:
            return []
        ceiling = ROW_ENTROPY_CEILING * math.log(int(self.config.head.num_prototypes))
        warnings = []
        if metrics["teacher_row_entropy"] > ceiling:
            warnings.append(
                f"uniform collapse: teacher_row_entropy {metrics['teacher_row_entropy']:.3f} > 0.9 ln K = {ceiling:.3f}, "
                "the teacher's CLS output is nearly the same uniform vector for every image (dino_loss ~ ln K); "
                "sharpen the teacher (teacher.temp 0.02 on the synthetic set) or make the targets predictable: "
                "weaker colour jitter, a lower teacher momentum or a larger model.layerscale_init for short runs "
                "(see configs/dinov2_synthetic.py).")
        if metrics.get("teacher_entropy", math.inf) < ENTROPY_FLOOR:
            warnings.append(
                f"one-prototype collapse: teacher_entropy {metrics['teacher_entropy']:.3f} < 1.0, every image "
                "picks the same few prototypes; use dino.centering='sinkhorn_knopp' or a higher teacher temperature.")
        for name in ("teacher_feature_std", "student_feature_std"):
            if metrics.get(name, math.inf) < FEATURE_STD_FLOOR:
                warnings.append(f"feature collapse ({name}): {name} {metrics[name]:.3f} < 0.1, the backbone maps "
                                "every image to nearly one point (normal just after a LayerScale-1e-5 init; if it "
                                "persists, raise dino.koleo_loss_weight or lower the lr).")
        return warnings

    # --- eval ---------------------------------------------------------------------------------------
    def evaluate(self, state: TrainState, step: int) -> dict[str, float]:
        ev = self.config.get("eval", ml_collections.ConfigDict())
        cache = self._eval_cache
        if "test" not in cache:
            cache["test"] = lvm_data.build_source(self.config.data, split="eval")
            cache["train"] = self._train_subset(int(ev.get("train_subset", 5000)))
            cache["ops"] = lvm_data.supervised_transforms(self.config.data, train=False)
            model = self.backbone

            def features(params, images):
                out = model.apply({"params": params}, images)
                return {"cls": out["cls"].astype(jnp.float32),
                        "patch_mean": jnp.mean(out["patch_tokens"], axis=1).astype(jnp.float32)}

            cache["features"] = features
        params = state.extra["teacher"]["backbone"]
        extract = lambda source: extract_features(  # noqa: E731
            cache["features"], params,
            self.eval_batches(source, cache["ops"], keys=("image", "label")), self.mesh)
        train, test = extract(cache["train"]), extract(cache["test"])
        num_classes = int(max(train["label"].max(), test["label"].max())) + 1
        knn = knn_classifier(train["cls"], train["label"], test["cls"], test["label"],
                             ks=tuple(ev.get("knn_ks", (10, 20, 100))),
                             temperature=float(ev.get("knn_temperature", 0.07)), num_classes=num_classes)
        result = {k: v for k, v in knn.items() if k != "knn_top5"}
        if ev.get("linear_probe", True):
            lin = linear_probe({"cls": train["cls"], "patch_mean": train["patch_mean"]}, train["label"],
                               {"cls": test["cls"], "patch_mean": test["patch_mean"]}, test["label"],
                               num_classes=num_classes, epochs=int(ev.get("linear_epochs", 50)))
            result.update(linear_top1=lin["linear_top1"], linear_top1_cls=lin["linear_top1_cls"])
        if step >= self.total_steps and getattr(self, "workdir", None) and int(ev.get("pictures", 4)):
            self.save_pictures(state, epath.Path(self.workdir) / "plots", int(ev.get("pictures", 4)))
        return result

    def _train_subset(self, size: int):
        source = lvm_data.build_source(self.config.data, split="train")  # never the multi-view records
        if not size or size >= len(source):
            return source
        # A fixed random subset: sources ordered by class (image folders) would bias a prefix.
        indices = np.sort(np.random.default_rng(0).choice(len(source), size, replace=False))
        return _Subset(source, indices)

    def save_pictures(self, state: TrainState, out_dir: epath.Path, count: int) -> list[str]:
        """Last-layer CLS attention and patch PCA of the teacher backbone for `count` eval images.

        Every process calls it: the teacher is gathered first (under an fsdp axis that spans hosts no
        process holds all of it, and process 0's device_get failed after the run's last eval)."""
        params = sharding.to_host(state.extra["teacher"]["backbone"])
        if jax.process_index() != 0:
            return []
        from lvm_jax.evals.pictures import save_dino_pictures

        loader = lvm_data.make_loader(self._eval_cache["test"], self._eval_cache["ops"], batch_size=count,
                                      shuffle=False, num_epochs=1, drop_remainder=False)
        images = next(iter(loader))["image"]
        return save_dino_pictures(self.backbone, params, images, str(out_dir), prefix="dinov2_",
                                  mean=tuple(self.config.data.get("mean", None) or lvm_data.IMAGENET_MEAN),
                                  std=tuple(self.config.data.get("std", None) or lvm_data.IMAGENET_STD))


# ------------------------------------------------------------------------------------------ host data


def _redraw_p_pair(raw: Any) -> tuple[float, float]:
    """`data.synthetic.view_redraw_p` as (start, end): a single probability p is (p, p)."""
    ps = [float(x) for x in (raw if isinstance(raw, (tuple, list)) else (raw,))]
    return ps[0], ps[-1]


class ViewRedrawSchedule(NamedTuple):
    """Re-draw probability of the view nuisances by training step: `start` until `begin`, linear to `end`
    at step `stop`, then `end` (a curriculum: views first share their scene, then only the shape)."""

    start: float
    end: float
    begin: int
    stop: int

    def __call__(self, step: int) -> float:
        if step <= self.begin:
            return self.start
        if step >= self.stop:
            return self.end
        return self.start + (self.end - self.start) * (step - self.begin) / (self.stop - self.begin)


class ScheduledViews:
    """grain operation: plain synthetic records -> multi-view records (`SyntheticViews`' layout) whose
    re-draw probability follows `schedule` at the record's training step.

    The step is the record's position in this process's stream (grain's `metadata.index`, which a
    restored iterator resumes) divided by the per-process batch, so views, and everything after them,
    are the same after a resume. A view re-draws group g when a fixed uniform of (seed, index, view, g)
    is below p, so raising p only adds re-drawn groups (`sample_view_scenes`). A lazy 1:1 map: the
    loader's state stays its sampler position.
    """

    def __init__(self, base, num_views: int, nuisances: tuple[str, ...], schedule: ViewRedrawSchedule,
                 records_per_step: int):
        self.base, self.num_views, self.nuisances = base, int(num_views), tuple(nuisances)
        self.schedule, self.records_per_step = schedule, int(records_per_step)

    def redraw_p(self, position: int) -> float:
        return float(self.schedule(int(position) // self.records_per_step))

    def render(self, index: int, position: int) -> dict[str, Any]:
        b = self.base
        views, labels = render_views(np.array([int(index)]), self.num_views, b.seed, b.split, b.image_size,
                                     b.num_classes, b.difficulty, self.nuisances, self.redraw_p(position))
        return dict(views=views[0], label=int(labels[0]), id=int(index))

    def __call__(self, records):
        for r in records:
            yield grain.Record(metadata=r.metadata, data=self.render(r.data["id"], r.metadata.index))


class SampleMasks(grain.RandomMapTransform):
    """Adds one sample's iBOT masks, padded to a fixed length, to a multi-crop record.

    Adds `masks` bool `[2, N]`, `mask_indices` int32 `[U]` (into the sample's
    `2 * N` global-crop patches, crop-major) and `mask_weights` float32 `[U]`
    (`1 / n_masked` of the crop, 0 on padding), with `U = int(N * mask_ratio[1])`
    for `mask_probability = 0.5`.
    """

    def __init__(self, collator: MaskCollator):
        self.collator = collator

    def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        m = self.collator(rng, 1)
        return {**record, "masks": m["masks"][0], "mask_indices": m["mask_indices"][0],
                "mask_weights": m["mask_weights"][0]}


class _Subset:
    """Rows `indices` of a random-access source."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.source[int(self.indices[index])]


# ------------------------------------------------------------------------------------------ optimizer


def _strip_boxes(tree: Any) -> Any:
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    return jax.tree_util.tree_map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def submodule(path: str) -> str:
    """'backbone' | 'dino_head' | 'ibot_head': the unit DINOv2 clips gradients over."""
    return "backbone" if path.startswith("backbone") else path.split("/")[1]


def is_last_layer(path: str) -> bool:
    """The weight-normalised prototype layer(s) (DINOv2's `last_layer`: direction and gain): frozen
    for the first steps."""
    return path.endswith(("prototypes", "prototype_gain"))


def has_weight_decay(path: str) -> bool:
    """DINOv2 decays every weight except biases, norms and LayerScale (our 'scale' leaves)."""
    return not path.endswith(("bias", "scale"))


def lr_multiplier(path: str, shape: tuple[int, ...], depth: int, layer_decay: float,
                  patch_embed_mult: float) -> np.ndarray:
    """DINOv2's `get_vit_lr_decay_rate` (backbone only; heads get 1) times the patch-embed multiplier."""
    if not path.startswith("backbone/"):
        return np.float32(1.0)
    name = path[len("backbone/"):]
    value = layer_decay_multiplier(name, len(shape), depth, layer_decay)
    if name.startswith("patch_embed"):
        value = value * patch_embed_mult
    return np.asarray(value, np.float32)


class _CountState(NamedTuple):
    count: jax.Array


def _counting(update_with_count):
    """A GradientTransformation whose update also sees the step count (for schedules)."""

    def init(params):
        del params
        return _CountState(jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        return update_with_count(updates, state.count, params), _CountState(state.count + 1)

    return optax.GradientTransformation(init, update)


def clip_by_submodule_norm(max_norm: float, groups: Any) -> optax.GradientTransformation:
    """torch `clip_grad_norm_` applied to each submodule (backbone / dino head / ibot head) separately."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        norms = _group_norms(updates, groups)
        scale = {g: jnp.minimum(1.0, max_norm / (n + 1e-6)) for g, n in norms.items()}
        return jax.tree_util.tree_map(lambda u, g: u * scale[g].astype(u.dtype), updates, groups), state

    return optax.GradientTransformation(init, update)


def _group_norms(tree: Any, groups: Any) -> dict[str, jax.Array]:
    squares: dict[str, jax.Array] = {}
    for leaf, group in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(groups)):
        squares[group] = squares.get(group, 0.0) + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    return {g: jnp.sqrt(s) for g, s in squares.items()}


def build_dinov2_optimizer(cfg: ml_collections.ConfigDict, scheds: dict[str, Any], params: Any,
                           depth: int) -> optax.GradientTransformation:
    """AdamW as DINOv2 sets up its param groups.

    Per leaf: lr = schedule(step) * layer-decay * patch-embed multiplier (the
    prototype layers use the last-layer schedule, 0 while frozen); weight decay
    = wd_schedule(step) except biases / norms / LayerScale, applied as in torch
    AdamW (`p -= lr * wd * p`). Gradients are clipped per submodule first.
    `params` may be abstract; only paths and shapes are read.
    """
    paths = jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), params)
    groups = jax.tree_util.tree_map(submodule, paths)
    last = jax.tree_util.tree_map(is_last_layer, paths)
    decay = jax.tree_util.tree_map(has_weight_decay, paths)
    mults = jax.tree_util.tree_map(
        lambda p, x: lr_multiplier(p, x.shape, depth, float(cfg.get("layer_decay", 1.0)),
                                   float(cfg.get("patch_embed_lr_mult", 1.0))), paths, params)

    def weight_decay(updates, count, params):
        wd = scheds["weight_decay"](count)
        return jax.tree_util.tree_map(lambda u, p, d: u + wd * p if d else u, updates, params, decay)

    def learning_rate(updates, count, params):
        del params
        lr, last_lr = scheds["lr"](count), scheds["last_layer_lr"](count)
        return jax.tree_util.tree_map(lambda u, is_last, mult: -(last_lr if is_last else lr) * mult * u,
                                      updates, last, mults)

    parts = []
    if cfg.get("clip_norm"):
        parts.append(clip_by_submodule_norm(float(cfg.clip_norm), groups))
    parts += [optax.scale_by_adam(b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                                  eps=float(cfg.get("eps", 1e-8))),
              _counting(weight_decay), _counting(learning_rate)]
    return optax.chain(*parts)


# ------------------------------------------------------------------------------------------ metrics


def _grad_norms(grads: dict[str, Any]) -> dict[str, jax.Array]:
    paths = jax.tree_util.tree_map_with_path(lambda p, _: submodule(path_str(p)), grads)
    return {f"grad_norm_{g}": n for g, n in _group_norms(grads, paths).items()}


def collapse_monitors(teacher_logits: jax.Array, teacher_temp: jax.Array, teacher_cls: jax.Array,
                      student_cls: jax.Array) -> dict[str, jax.Array]:
    """Collapse indicators over the global batch (see the module docstring for their floors).

    Args: teacher_logits `[B, 2, K]` (DINO head), teacher_cls / student_cls `[B, 2, D]` backbone CLS tokens.
    """
    probs = jax.nn.softmax(teacher_logits.astype(jnp.float32) / teacher_temp, axis=-1)
    probs = probs.reshape(-1, probs.shape[-1])
    entropy = lambda p: -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1)  # noqa: E731

    def feature_std(x):
        x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return jnp.mean(jnp.std(x, axis=0)) * math.sqrt(x.shape[-1])

    return {"teacher_entropy": entropy(jnp.mean(probs, axis=0)),
            "teacher_row_entropy": jnp.mean(entropy(probs)),
            "teacher_feature_std": feature_std(teacher_cls),
            "student_feature_std": feature_std(student_cls)}
