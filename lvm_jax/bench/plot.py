"""`lvm-bench --json PATH` also draws PATH's results as a bar chart, `PATH` with `.png`.

One group of bars per benchmark (model, variant, mode, dtype, batch, resolution),
one bar per framework (lvm_jax and the PyTorch reference side by side), the
bar length its img/s, labelled with the img/s, MFU and, on the reference's bar,
lvm_jax's speed ratio to it. Matplotlib is imported here only.
"""
from __future__ import annotations

import os
from typing import Any

_KEY = ("model", "variant", "mode", "dtype", "batch", "res")
_COLOURS = {"jax": "tab:blue", "torch": "tab:orange", "grain": "tab:green"}


def png_path(json_path: str) -> str:
  """`results.json` -> `results.png` (any other name gets `.png` appended)."""
  stem, ext = os.path.splitext(json_path)
  return (stem if ext.lower() == ".json" else json_path) + ".png"


def _group_label(row: dict[str, Any]) -> str:
  model = {"vit": "ViT", "clip": "CLIP", "dinov2": "DINOv2", "data": "data"}.get(row.get("model"), row.get("model"))
  return (f"{model} {row.get('variant') or ''} {row.get('mode', '')}\n"
          f"{row.get('dtype', '')} b{row.get('batch')} {row.get('res')}px").replace("  ", " ")


def save_results_plot(payload: dict[str, Any], path: str) -> str | None:
  """Draws `payload['results']` (lvm-bench rows) to `path` (local or gs://); returns it, or None
  when there is nothing to draw (no row with an img/s) or matplotlib is missing (the GPU image
  may lack it; the JSON and the printed table are the results, the picture is a convenience)."""
  rows = [r for r in payload.get("results", []) if r.get("img_per_s")]
  if not rows:
    return None
  try:
    import matplotlib
  except ImportError:
    return None

  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  from lvm_jax.workdir import as_path, save_figure

  groups: dict[tuple, list[dict[str, Any]]] = {}
  for row in rows:
    groups.setdefault(tuple(row.get(k) for k in _KEY), []).append(row)
  height = 0.8 / max(len(g) for g in groups.values())
  fig, ax = plt.subplots(figsize=(8.0, 1.2 + 0.5 * len(rows)))
  top = max(r["img_per_s"] for r in rows)
  seen: set[str] = set()
  for g, members in enumerate(groups.values()):
    jax_ips = next((r["img_per_s"] for r in members if r["framework"] == "jax"), None)
    for i, row in enumerate(members):
      y = g + (i - (len(members) - 1) / 2) * height
      fw = row["framework"]
      ax.barh(y, row["img_per_s"], height * 0.9, color=_COLOURS.get(fw, "tab:gray"),
              label=None if fw in seen else ("lvm_jax" if fw == "jax" else fw))
      seen.add(fw)
      text = f"{row['img_per_s']:.4g} img/s"
      if row.get("mfu") is not None:
        text += f", MFU {100 * row['mfu']:.1f}%"
      if fw != "jax" and jax_ips:
        text += f"  (lvm_jax {jax_ips / row['img_per_s']:.2f}x)"
      ax.text(row["img_per_s"] + 0.01 * top, y, f"{text}  [{row.get('impl') or fw}]"[:110], va="center",
              fontsize=6.5)
  ax.set_yticks(range(len(groups)))
  ax.set_yticklabels([_group_label(m[0]) for m in groups.values()], fontsize=7)
  ax.invert_yaxis()  # the first benchmark on top, as in the table
  ax.set_xlim(0, top * 1.9)  # room for the labels
  ax.set_xlabel("images / s (median step; higher is better)")
  env = payload.get("env") or {}
  ax.set_title(f"lvm-bench on {env.get('device_kind', '?')} x{env.get('device_count', '?')}"
               f" (jax {env.get('jax', '?')})", fontsize=9)
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  save_figure(fig, as_path(path, what="--json"))
  plt.close(fig)
  return path
