"""The machinery every converter shares: one error type, name-mapping rules, tree helpers.

A converter turns a checkpoint's flat `{name: array}` dict into our param tree
with a list of `Rule`s, `(flax_path, source_key(s), fn)`: the flax leaf at
`flax_path` ('encoder/blocks_0/attn/query/kernel') is `fn(*sources)`.
`assemble` applies the rules, checks every produced shape against the model's
own `eval_shape` init and raises ONE `ConversionError` listing the missing
keys, the keys nothing consumed and the shape mismatches.

Rules work on numpy arrays and on `jax.ShapeDtypeStruct`s alike (shape-only
conversion of real-size checkpoints without allocating), so `fn`s use array
methods (`.T`, `.reshape`, `.transpose`, slicing, `+`) or jnp.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvm_jax.errors import UserError

Rule = tuple[str, "str | tuple[str, ...]", "Callable[..., Any] | None"]


class ConversionError(UserError):
    """A checkpoint that cannot be mapped onto the model (wrong architecture, missing keys, shapes)."""


class StrayRuleError(AssertionError):
    """Rules produce params the model does not have, from keys the checkpoint does have.

    A converter bug, unless a user override removed those params from the model (e.g.
    final_norm=False on a checkpoint with a final norm): `from_checkpoint` tells the two apart
    and turns the second into a ConversionError. `targets`: {model param: its source keys}.
    """

    def __init__(self, targets: dict[str, tuple[str, ...]], what: str):
        self.targets = targets
        super().__init__(f"converter rules target [{_listing(list(targets))}], which the {what} does not have")


# --- trees -------------------------------------------------------------------------------------

def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a/b/c': leaf}."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/c': leaf} -> nested dict."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, last = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def unbox(tree: Any) -> Any:
    """Strips flax logical-partitioning boxes structurally (safe on abstract values)."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree_util.tree_map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def expected_params(model: nn.Module, *inputs: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat {path: ShapeDtypeStruct} of `model.init(rng, *inputs)['params']`, nothing allocated."""
    shapes = jax.eval_shape(lambda: unbox(model.init(jax.random.PRNGKey(0), *inputs))["params"])
    return flatten(shapes)


_BLOCK = re.compile(r"^blocks_(\d+)$")


def stack_blocks(tree: Any) -> Any:
    """Turns every {'blocks_0': t0, 'blocks_1': t1, ...} into {'blocks': stack(t_i)} (scan_layers layout)."""
    if not isinstance(tree, Mapping):
        return tree
    tree = {k: stack_blocks(v) for k, v in tree.items()}
    indices = sorted(int(m.group(1)) for k in tree if (m := _BLOCK.match(k)))
    if not indices:
        return tree
    blocks = [tree.pop(f"blocks_{i}") for i in indices]

    def stack(*leaves):
        if isinstance(leaves[0], jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((len(leaves),) + tuple(leaves[0].shape), leaves[0].dtype)
        return np.stack([np.asarray(x) for x in leaves])

    tree["blocks"] = jax.tree_util.tree_map(stack, *blocks)
    return tree


def unstack_blocks(tree: Any) -> Any:
    """Inverse of `stack_blocks`: {'blocks': leaves [L, ...]} -> {'blocks_0' ... 'blocks_{L-1}'}."""
    if not isinstance(tree, Mapping):
        return tree
    tree = {k: unstack_blocks(v) for k, v in tree.items()}
    if "blocks" in tree and isinstance(tree["blocks"], Mapping):
        stacked = tree.pop("blocks")
        depth = jax.tree_util.tree_leaves(stacked)[0].shape[0]
        for i in range(depth):
            tree[f"blocks_{i}"] = jax.tree_util.tree_map(lambda x: x[i], stacked)
    return tree


def has_stacked_blocks(tree: Mapping[str, Any]) -> bool:
    """Whether a param tree is in the scan_layers layout (an encoder with one 'blocks' subtree)."""
    return any(("/" + p).count("/blocks/") for p in flatten(tree))


# --- torch-layout transforms (work on numpy arrays and on tracers) -----------------------------

def linear(w):
    """torch Linear weight [out, in] -> kernel [in, out]."""
    return w.T


def conv(w):
    """torch Conv2d weight [out, in, kh, kw] -> flax kernel [kh, kw, in, out]."""
    return w.transpose(2, 3, 1, 0)


def heads_in(num_heads: int) -> Callable:
    """torch [heads*kv, embed] -> [embed, heads, kv] (query/key/value kernels)."""
    return lambda w: w.T.reshape(w.shape[1], num_heads, -1)


def heads_bias(num_heads: int) -> Callable:
    """[heads*kv] -> [heads, kv]."""
    return lambda b: b.reshape(num_heads, -1)


def heads_out(num_heads: int) -> Callable:
    """torch out-proj [embed, heads*kv] -> [heads, kv, embed]."""
    return lambda w: w.T.reshape(num_heads, -1, w.shape[0])


def chunk(index: int, count: int, fn: Callable | None = None) -> Callable:
    """Takes the `index`-th of `count` equal row blocks (fused qkv / kv / SwiGLU w12), then `fn`."""
    def take(w):
        part = w.reshape(count, -1, *w.shape[1:])[index]
        return part if fn is None else fn(part)
    return take


def layer(index: int, fn: Callable | None = None) -> Callable:
    """Slices layer `index` of a stacked (scanned) array, then `fn`."""
    return lambda w: w[index] if fn is None else fn(w[index])


# --- rule helpers ---------------------------------------------------------------------------------

def norm_rules(dst: str, weight: str, bias: str, scale_name: str = "scale") -> list[Rule]:
    return [(f"{dst}/{scale_name}", weight, None), (f"{dst}/bias", bias, None)]


def dense_rules(dst: str, weight: str, bias: str | None, fn: Callable | None = linear) -> list[Rule]:
    rules: list[Rule] = [(f"{dst}/kernel", weight, fn)]
    if bias is not None:
        rules.append((f"{dst}/bias", bias, None))
    return rules


def attention_rules(dst: str, num_heads: int, q: tuple, k: tuple, v: tuple, out: tuple) -> list[Rule]:
    """Rules for our Attention from torch-layout projections.

    q/k/v: (weight_key, bias_key_or_None, (index, count) or None) -- the last
    entry picks a row block of a fused qkv/kv/in_proj tensor. out: (weight, bias).
    """
    rules: list[Rule] = []
    for name, (weight, bias, part) in zip(("query", "key", "value"), (q, k, v)):
        wfn, bfn = heads_in(num_heads), heads_bias(num_heads)
        if part is not None:
            wfn, bfn = chunk(*part, wfn), chunk(*part, bfn)
        rules.append((f"{dst}/{name}/kernel", weight, wfn))
        if bias is not None:
            rules.append((f"{dst}/{name}/bias", bias, bfn))
    rules.append((f"{dst}/out/kernel", out[0], heads_out(num_heads)))
    if out[1] is not None:
        rules.append((f"{dst}/out/bias", out[1], None))
    return rules


# --- assembling ---------------------------------------------------------------------------------

def _apply(fn: Callable | None, arrays: list[Any]) -> Any:
    if fn is None:
        if len(arrays) != 1:
            raise AssertionError("a rule with several sources needs a function")
        return arrays[0]
    if any(isinstance(a, jax.ShapeDtypeStruct) for a in arrays):
        return jax.eval_shape(fn, *arrays)
    return fn(*arrays)


def _cast(value: Any, dtype: Any) -> Any:
    if isinstance(value, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(value.shape, dtype)
    return np.asarray(value, dtype=dtype)


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def assemble(rules: Iterable[Rule], tensors: Mapping[str, Any], expected: Mapping[str, Any], *,
             source: str, what: str, ignore: Callable[[str], bool] = lambda key: False) -> dict[str, Any]:
    """Applies `rules` to `tensors`; returns the nested param tree in `expected`'s dtypes.

    Raises one ConversionError naming every missing key, every key no rule used
    (unless `ignore(key)`), every shape mismatch, and every model param no rule
    produced. Rules whose target the model lacks raise StrayRuleError instead.
    """
    missing: dict[str, None] = {}
    mismatched: list[str] = []
    produced: dict[str, Any] = {}
    attempted: set[str] = set()
    used: set[str] = set()
    stray: dict[str, tuple[str, ...]] = {}
    for dst, src, fn in rules:
        srcs = (src,) if isinstance(src, str) else tuple(src)
        attempted.add(dst)
        absent = [s for s in srcs if s not in tensors]
        used.update(s for s in srcs if s in tensors)
        if absent:
            missing.update(dict.fromkeys(absent))
            continue
        want = expected.get(dst)
        if want is None:
            stray[dst] = srcs
            continue
        shapes = " + ".join(f"{s} {tuple(tensors[s].shape)}" for s in srcs)
        try:
            value = _apply(fn, [tensors[s] for s in srcs])
        except (ValueError, TypeError, IndexError):  # e.g. a reshape into heads that does not divide
            mismatched.append(f"{shapes} cannot become {dst} {tuple(want.shape)}")
            continue
        if tuple(value.shape) != tuple(want.shape):
            mismatched.append(f"{shapes} -> {dst} needs {tuple(want.shape)}")
            continue
        produced[dst] = _cast(value, want.dtype)
    if stray:
        raise StrayRuleError(stray, what)
    unexpected = sorted(k for k in tensors if k not in used and not ignore(k))
    uncovered = sorted(set(expected) - attempted)
    if missing or unexpected or mismatched or uncovered:
        parts = []
        if missing:
            parts.append(f"missing keys [{_listing(list(missing))}]")
        if unexpected:
            parts.append(f"unexpected keys [{_listing(unexpected)}]")
        if mismatched:
            parts.append(f"shape mismatches [{_listing(mismatched)}]")
        if uncovered:
            parts.append(f"model params with no source [{_listing(uncovered)}]")
        raise ConversionError(
            f"{source} does not fit the {what} inferred from it: {'; '.join(parts)}. Check that the file "
            "is the checkpoint you meant (pass format=... to pick the reader) or correct the inferred "
            "architecture with overrides (e.g. num_heads=..., act=...).")
    return unflatten(produced)


def require(tensors: Mapping[str, Any], keys: Iterable[str], *, source: str, what: str) -> None:
    """Raises a ConversionError when any of `keys` is absent (before inferring the architecture)."""
    absent = [k for k in keys if k not in tensors]
    if absent:
        sample = sorted(tensors)[:8]
        raise ConversionError(
            f"{source} is not a {what} checkpoint: missing keys [{_listing(absent)}] (its keys start "
            f"[{_listing(sample, 8)}]). Pass format=... if the format was detected wrongly.")


def count_indexed(tensors: Iterable[str], pattern: str) -> int:
    """Number of consecutive indices i matched by `pattern` (one group), e.g. r'blocks\\.(\\d+)\\.'."""
    regex = re.compile(pattern)
    found = {int(m.group(1)) for key in tensors if (m := regex.match(key))}
    if not found:
        return 0
    if found != set(range(max(found) + 1)):
        gaps = sorted(set(range(max(found) + 1)) - found)
        raise ConversionError(f"Layer indices for {pattern!r} have gaps {gaps}; the checkpoint is incomplete.")
    return max(found) + 1


def as_array(x: Any) -> Any:
    """numpy array for real tensors; ShapeDtypeStructs pass through."""
    return x if isinstance(x, jax.ShapeDtypeStruct) else np.asarray(x)


def concat(arrays: list[Any], axis: int) -> Any:
    """Concatenation that also works on tracers (shape-only conversion)."""
    if not all(isinstance(a, np.ndarray) for a in arrays):
        return jnp.concatenate(arrays, axis=axis)
    return np.concatenate(arrays, axis=axis)
