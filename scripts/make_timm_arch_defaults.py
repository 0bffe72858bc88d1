"""Generates lvm_jax/convert/timm_arch_defaults.py: the timm VisionTransformer defaults a checkpoint cannot show.

    .venv/bin/python scripts/make_timm_arch_defaults.py      # needs torch and timm

timm's hub config.json records only the `model_args` a user passed to `create_model`, never the
architecture's own defaults, and a fused qkv weight does not show the head count. So the timm converter
(lvm_jax/convert/timm.py) guesses heads from the width, the activation and LayerNorm eps from the name
(`guess_defaults`); this script finds where that guess is wrong. Every timm model named like
`timm.VIT_PREFIXES` is built on the meta device (depth=1: nothing allocated, no weights) and:

- not exactly a VisionTransformer (eva.py's Perception Encoder / RoPE / DINOv3, hybrid, relpos, distilled
  deit): nothing is recorded, but the converter's `_NOT_VIT` denylist must match the name (it is what
  refuses such names when they are missing from the table, e.g. from another timm version);
- a VisionTransformer the converter cannot map (its rules do not consume exactly the state dict's keys):
  REFUSED[name] = the part lvm_jax's ViT lacks (parallel blocks, differential attention, a CNN stem);
- else VIT_ARCHS gets the name, and DEFAULTS[name] the num_heads / act / norm_eps the built model has
  where the converter's guess at the default width differs (SigLIP 2's tanh GELU, giant-opt's 16 heads);
- AMBIGUOUS_HEADS: widths at which timm's ViTs use different head counts (or not width // 64's rule),
  so a name missing from the table cannot have its heads guessed from the width.

tests/test_convert_timm_archs.py checks that the committed module equals `generate()` on the installed timm.
"""
from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "lvm_jax" / "convert" / "timm_arch_defaults.py"


def _probe_act(module: Any) -> str | None:
    """The converter's name for an activation module, found by evaluating it (class names vary)."""
    import torch
    import torch.nn.functional as F

    x = torch.linspace(-4.0, 4.0, 161, dtype=torch.float64)
    refs = {"gelu": F.gelu(x), "gelu_tanh": F.gelu(x, approximate="tanh"),
            "quick_gelu": x * torch.sigmoid(1.702 * x), "silu": F.silu(x), "relu": F.relu(x)}
    y = module(x)
    return next((name for name, ref in refs.items() if torch.allclose(y, ref, atol=1e-7)), None)


def _refusal(model: Any, error: str) -> str:
    """What lvm_jax's ViT lacks, named by the first non-standard timm component."""
    from timm.layers import GluMlp, Mlp, PatchEmbed
    from timm.models.vision_transformer import Attention, Block

    block = model.blocks[0]
    if type(model.patch_embed) is not PatchEmbed:
        return f"a {type(model.patch_embed).__name__} patch embedding"
    if type(block) is not Block:
        return f"{type(block).__name__} blocks"
    if type(block.attn) is not Attention:
        return f"{type(block.attn).__name__} attention"
    if type(block.mlp) not in (Mlp, GluMlp):
        return f"{type(block.mlp).__name__} MLPs"
    return f"layers the converter does not map ({error.split(': ', 1)[-1][:120]})"


def _build(name: str) -> Any:
    """timm's model on the meta device with one block (depth changes no default recorded here), or None."""
    import timm
    import torch

    with torch.device("meta"):
        for extra in ({"weight_init": "skip"}, {}):  # skipping timm's init halves the time; not every class takes it
            try:
                return timm.create_model(name, pretrained=False, depth=1, **extra)
            except Exception:  # noqa: BLE001 -- not a VisionTransformer (whose __init__ takes both)
                pass
    return None


def generate() -> dict[str, Any]:
    """{'VIT_ARCHS', 'REFUSED', 'DEFAULTS', 'AMBIGUOUS_HEADS'} from the installed timm's registry."""
    import jax
    import numpy as np
    import timm
    import torch
    from timm.layers import Mlp
    from timm.models.vision_transformer import VisionTransformer

    sys.path.insert(0, str(ROOT))
    from lvm_jax.convert import timm as converter
    from lvm_jax.convert.core import ConversionError
    from lvm_jax.convert.readers import Checkpoint

    vit_archs, refused, defaults, not_vit = [], {}, {}, []
    heads_by_width: dict[int, set[int]] = {}
    for name in sorted(timm.list_models()):
        if not name.startswith(converter.VIT_PREFIXES):
            continue
        model = _build(name)
        if type(model) is not VisionTransformer:
            not_vit.append(name)
            continue
        block = model.blocks[0]
        heads = getattr(getattr(block, "attn", None), "num_heads", None)
        # The activation the converter's `act` sets: the blocks' MLP (a SwiGLU has its own), else the MAP head's.
        act_module = block.mlp.act if type(getattr(block, "mlp", None)) is Mlp else (
            model.attn_pool.mlp.act if getattr(model, "attn_pool", None) is not None else None)
        act = _probe_act(act_module) if act_module is not None else None
        eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
        # The converter's own mapping, without the name (so neither this table nor the guess is used): it
        # accepts the model when its rules consume exactly the state dict's keys. (Comparing keys, not
        # running from_checkpoint's shape check, keeps this fast enough for the test; the shapes of a
        # VisionTransformer's parts follow from its keys.)
        tensors = {k: jax.ShapeDtypeStruct(tuple(v.shape), np.float32)
                   for k, v in model.state_dict().items() if v.is_floating_point()}
        # A SwiGLU's own gate activation is what its act_layer names (the converter refuses a non-SiLU gate).
        mlp = getattr(block, "mlp", None)
        gate = getattr(mlp, "act", None) if mlp is not None and type(mlp) is not Mlp else None
        act_layer = (_probe_act(gate) if gate is not None else None) or act or "gelu"
        config = {"global_pool": model.global_pool, "num_classes": model.num_classes,
                  "model_args": {"num_heads": heads, "act_layer": act_layer, "depth": 1}}
        try:
            if heads is None or (act_module is not None and act is None) or len(eps) != 1:
                raise ConversionError(f"x: heads {heads}, activation {act_module}, LayerNorm eps {sorted(eps)}")
            kwargs, facts = converter.infer_config(Checkpoint(tensors, config, {}, pathlib.Path(name)))
            used = {key for _, src, _ in converter.rules(kwargs, facts)
                    for key in ([src] if isinstance(src, str) else src)}
            if used != set(tensors):
                raise ConversionError(f"x: missing {sorted(used - set(tensors))[:3]}, "
                                      f"unused {sorted(set(tensors) - used)[:3]}")
        except ConversionError as e:
            refused[name] = _refusal(model, str(e))
            continue
        vit_archs.append(name)
        width = model.embed_dim
        heads_by_width.setdefault(width, set()).add(heads)
        guess = converter.guess_defaults(name, width)
        actual = dict(num_heads=heads, act=act, norm_eps=eps.pop())
        entry = {k: v for k, v in actual.items() if v is not None and v != guess[k]}
        if entry:
            defaults[name] = entry

    stray = [n for n in not_vit if not converter._NOT_VIT.search(n)]
    caught = [n for n in vit_archs if converter._NOT_VIT.search(n)]
    if stray or caught:
        raise SystemExit(f"lvm_jax/convert/timm.py's _NOT_VIT misses non-VisionTransformer archs {stray} and "
                         f"matches VisionTransformer archs {caught}; fix the pattern and rerun.")
    ambiguous = {}
    for width, counts in sorted(heads_by_width.items()):
        guess = converter.guess_defaults("", width)["num_heads"]
        if counts != {guess}:
            ambiguous[width] = tuple(sorted(counts | ({guess} if guess else set())))
    return dict(VIT_ARCHS=frozenset(vit_archs), REFUSED=refused, DEFAULTS=defaults, AMBIGUOUS_HEADS=ambiguous)


def _wrapped(items: list[str], indent: str = "    ", width: int = 116) -> str:
    lines, line = [], indent
    for item in items:
        if len(line) + len(item) + 1 > width and line.strip():
            lines.append(line.rstrip())
            line = indent
        line += item + " "
    lines.append(line.rstrip())
    return "\n".join(lines)


def render(data: dict[str, Any], timm_version: str) -> str:
    """The module's source text."""
    names = _wrapped([f'"{n}",' for n in sorted(data["VIT_ARCHS"])])
    refused = "\n".join(f'    "{n}": "{why}",' for n, why in sorted(data["REFUSED"].items()))
    defaults = "\n".join(f'    "{n}": {json.dumps(entry)},' for n, entry in sorted(data["DEFAULTS"].items()))
    ambiguous = ", ".join(f"{w}: {counts!r}" for w, counts in sorted(data["AMBIGUOUS_HEADS"].items()))
    return f'''"""timm VisionTransformer defaults that a timm checkpoint cannot show (used by convert/timm.py).

GENERATED by scripts/make_timm_arch_defaults.py from timm {timm_version}; do not edit, rerun the script
(tests/test_convert_timm_archs.py checks this file against the installed timm).
"""
from __future__ import annotations

from typing import Any

# timm architectures that are VisionTransformers the converter maps.
VIT_ARCHS: frozenset[str] = frozenset({{
{names}
}})

# VisionTransformers with parts lvm_jax's ViT lacks.
REFUSED: dict[str, str] = {{
{refused}
}}

# Where the architecture's default differs from what the converter guesses from name and width.
DEFAULTS: dict[str, dict[str, Any]] = {{
{defaults}
}}

# Widths whose head count timm's ViTs do not agree on (or the width rule does not give): an unlisted
# architecture of such a width must say.
AMBIGUOUS_HEADS: dict[int, tuple[int, ...]] = {{{ambiguous}}}
'''


def main() -> None:
    import timm

    OUT.write_text(render(generate(), timm.__version__))
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
