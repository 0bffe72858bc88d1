"""iBOT block masks, built on the host with static shapes (DINOv2 `masking.py` + `collate.py`).

Per batch, a fraction `mask_probability` (0.5) of the global-crop rows get a
BEiT-style block mask; their target counts are spread evenly over
`mask_ratio` = [0.1, 0.5] of the N patches (row i of the masked ones draws its
ratio uniformly in the i-th of equal sub-intervals), and the rows are shuffled.

Static shapes: the device step gathers masked tokens through padded index
arrays whose length is DINOv2's `upperbound` (sum of each masked row's largest
possible count), fixed by the batch size alone, so it never recompiles.

Groups: the batch is cut into `num_groups` contiguous runs of samples, and the
recipe above is applied to each run separately, with indices local to the run.
Choose `num_groups` = the number of devices the batch is split over (or a
multiple): then every gather stays on its device. `num_groups=1` is DINOv2's
per-GPU collate applied to the whole batch.

Unlike the reference generator, which can stop short when blocks no longer fit,
`BlockMaskGenerator` tops up with single patches next to the mask, so every row
gets exactly its target count.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} is outside [0, 1]; give a fraction of the patches between 0 and 1.")


@dataclasses.dataclass(frozen=True)
class BlockMaskGenerator:
    """BEiT block masking on an `(h, w)` patch grid.

    Attributes:
      grid: `(h, w)` patches per side (224 / 14 -> (16, 16)).
      min_num_patches: smallest block (4).
      max_num_patches: largest block; None -> half the grid, as DINOv2's training sets it.
      min_aspect: block aspect ratios are log-uniform in [min_aspect, 1 / min_aspect] (0.3).
    """

    grid: tuple[int, int]
    min_num_patches: int = 4
    max_num_patches: int | None = None
    min_aspect: float = 0.3

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def __call__(self, rng: np.random.Generator, num_masked: int) -> np.ndarray:
        """Returns a `[h, w]` bool mask with exactly `num_masked` True entries."""
        h, w = self.grid
        if not 0 <= num_masked <= h * w:
            raise ValueError(f"num_masked={num_masked} is outside [0, {h * w}] for a {h}x{w} patch grid.")
        mask = np.zeros((h, w), bool)
        max_block = self.max_num_patches if self.max_num_patches is not None else 0.5 * h * w
        log_aspect = (math.log(self.min_aspect), -math.log(self.min_aspect))
        count = 0
        while count < num_masked:
            added = self._add_block(rng, mask, min(num_masked - count, max_block), log_aspect)
            if added == 0:
                break
            count += added
        self._top_up(rng, mask, num_masked - count)
        return mask

    def _add_block(self, rng, mask, max_patches, log_aspect) -> int:
        h, w = self.grid
        for _ in range(10):  # a few tries to place a block that adds <= max_patches new patches
            area = rng.uniform(self.min_num_patches, max(max_patches, self.min_num_patches))
            aspect = math.exp(rng.uniform(*log_aspect))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if 0 < bh < h and 0 < bw < w:
                top = int(rng.integers(0, h - bh + 1))
                left = int(rng.integers(0, w - bw + 1))
                new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())
                if 0 < new <= max_patches:
                    mask[top:top + bh, left:left + bw] = True
                    return new
        return 0

    @staticmethod
    def _top_up(rng, mask, missing: int) -> None:
        # Single patches, preferring neighbours of the mask so it stays blocky.
        for _ in range(missing):
            grown = mask.copy()
            grown[1:] |= mask[:-1]
            grown[:-1] |= mask[1:]
            grown[:, 1:] |= mask[:, :-1]
            grown[:, :-1] |= mask[:, 1:]
            candidates = np.flatnonzero(grown & ~mask)
            if candidates.size == 0:
                candidates = np.flatnonzero(~mask)
            mask.flat[rng.choice(candidates)] = True


@dataclasses.dataclass(frozen=True)
class MaskCollator:
    """Builds the iBOT masks of one (process-local) batch.

    Attributes:
      grid: `(h, w)` patch grid of a global crop.
      mask_ratio: `(min, max)` fraction of patches masked in a masked row ((0.1, 0.5)).
      mask_probability: fraction of global-crop rows that are masked (0.5).
      n_global_crops: global crops per sample (2).
      num_groups: contiguous sample groups with their own indices (see module doc).
      generator: block-mask settings; None -> `BlockMaskGenerator(grid)`.
    """

    grid: tuple[int, int]
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5
    n_global_crops: int = 2
    num_groups: int = 1
    generator: BlockMaskGenerator | None = None

    def __post_init__(self):
        lo, hi = self.mask_ratio
        _check_ratio("mask_ratio min", lo)
        _check_ratio("mask_ratio max", hi)
        if lo > hi:
            raise ValueError(f"mask_ratio={self.mask_ratio} has min > max; give (min, max).")
        _check_ratio("mask_probability", self.mask_probability)
        if self.num_groups < 1:
            raise ValueError(f"num_groups={self.num_groups} must be >= 1.")

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def _bins(self, rows: int) -> np.ndarray:
        n_masked_rows = int(rows * self.mask_probability)
        return np.linspace(self.mask_ratio[0], self.mask_ratio[1], n_masked_rows + 1)

    def upper_bound(self, batch_size: int) -> int:
        """Padded length U of each group's index arrays (DINOv2's `upperbound`) for `batch_size` samples."""
        rows = self._group_samples(batch_size) * self.n_global_crops
        bins = self._bins(rows)
        return max(int(sum(int(self.num_patches * p) for p in bins[1:])), 1)

    def _group_samples(self, batch_size: int) -> int:
        if batch_size % self.num_groups:
            raise ValueError(
                f"batch of {batch_size} samples does not split into num_groups={self.num_groups}; "
                "use a num_groups that divides the per-process batch.")
        return batch_size // self.num_groups

    def __call__(self, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
        """Masks for `batch_size` samples.

        Returns a dict of NumPy arrays:
          masks:        `[B, n_global, N]` bool, True = patch replaced by the mask token.
          mask_indices: `[G, U]` int32 indices into the group's tokens flattened as
                        `[(B/G) * n_global * N]` (sample, crop, patch order); padding -> 0.
          mask_weights: `[G, U]` float32, `1 / n_masked(row)` per masked patch, 0 for padding.
          mask_valid:   `[G, U]` bool, True on real masked patches.
        """
        generator = self.generator or BlockMaskGenerator(self.grid)
        if generator.grid != tuple(self.grid):
            raise ValueError(f"generator grid {generator.grid} differs from the collator grid {self.grid}.")
        n = self.num_patches
        per_group = self._group_samples(batch_size)
        rows = per_group * self.n_global_crops
        bins = self._bins(rows)
        bound = self.upper_bound(batch_size)
        masks = np.zeros((self.num_groups, rows, n), bool)
        indices = np.zeros((self.num_groups, bound), np.int32)
        weights = np.zeros((self.num_groups, bound), np.float32)
        for g in range(self.num_groups):
            counts = [int(n * rng.uniform(bins[i], bins[i + 1])) for i in range(len(bins) - 1)]
            counts += [0] * (rows - len(counts))
            rng.shuffle(counts)
            for r, c in enumerate(counts):
                masks[g, r] = generator(rng, c).reshape(-1)
            flat = np.flatnonzero(masks[g])
            per_row = masks[g].sum(-1)
            indices[g, :flat.size] = flat
            weights[g, :flat.size] = (1.0 / np.maximum(per_row, 1))[flat // n]
        return dict(
            masks=masks.reshape(batch_size, self.n_global_crops, n),
            mask_indices=indices,
            mask_weights=weights,
            mask_valid=weights > 0,
        )
