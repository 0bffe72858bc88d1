"""iBOT block masks: ratios honoured, static shapes, index/weight layout, bad input."""

import numpy as np
import pytest

from lvm_jax.data.masking import BlockMaskGenerator, MaskCollator

GRID = (14, 14)
N = GRID[0] * GRID[1]


@pytest.mark.parametrize("num_masked", [0, 1, 3, 20, 57, 98])
def test_generator_hits_the_requested_count(num_masked):
    gen = BlockMaskGenerator(GRID)
    for seed in range(5):
        mask = gen(np.random.default_rng(seed), num_masked)
        assert mask.shape == GRID and mask.dtype == bool
        assert abs(int(mask.sum()) - num_masked) <= 1


def test_generator_masks_are_blocky():
    # Block masks: most masked patches have a masked 4-neighbour (random masks at 30% would not).
    mask = BlockMaskGenerator(GRID)(np.random.default_rng(0), int(0.3 * N))
    padded = np.pad(mask, 1)
    neighbour = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    assert (neighbour & mask).sum() / mask.sum() > 0.9


@pytest.mark.parametrize("batch,num_groups", [(8, 1), (16, 4), (6, 6)])
def test_collator_ratios_and_layout(batch, num_groups):
    lo, hi = 0.1, 0.5
    collate = MaskCollator(GRID, mask_ratio=(lo, hi), mask_probability=0.5, num_groups=num_groups)
    out = collate(np.random.default_rng(0), batch)
    masks = out["masks"]
    assert masks.shape == (batch, 2, N)
    rows_per_group = batch // num_groups * 2
    n_masked_rows = int(rows_per_group * 0.5)
    bins = np.linspace(lo, hi, n_masked_rows + 1)
    for g in range(num_groups):
        group = masks[g * batch // num_groups:(g + 1) * batch // num_groups].reshape(rows_per_group, N)
        counts = np.sort(group.sum(-1))[::-1]
        # half the rows are masked; the i-th largest count lies in the i-th largest ratio bin (within one patch)
        assert (counts > 0).sum() == n_masked_rows
        for i, c in enumerate(counts[:n_masked_rows][::-1]):
            assert int(N * bins[i]) - 1 <= c <= int(N * bins[i + 1]) + 1
        # indices/weights reproduce exactly the masked patches of the group, with 1/n_masked weights
        idx, w, valid = out["mask_indices"][g], out["mask_weights"][g], out["mask_valid"][g]
        flat = group.reshape(-1)
        assert sorted(idx[valid]) == list(np.flatnonzero(flat))
        per_row = group.sum(-1)
        np.testing.assert_allclose(w[valid], 1.0 / per_row[idx[valid] // N])
        assert np.all(w[~valid] == 0) and np.all(idx[~valid] == 0)
        # each masked row's weights sum to 1
        np.testing.assert_allclose(np.bincount(idx[valid] // N, weights=w[valid], minlength=rows_per_group)[
            per_row > 0], 1.0, rtol=1e-6)


def test_static_shapes_across_batches():
    collate = MaskCollator(GRID, num_groups=2)
    shapes = {tuple((k, v.shape, v.dtype) for k, v in sorted(collate(np.random.default_rng(s), 8).items()))
              for s in range(6)}
    assert len(shapes) == 1
    bound = collate.upper_bound(8)
    # DINOv2's upperbound: sum over masked rows of int(N * bin max)
    rows = 8 // 2 * 2
    bins = np.linspace(0.1, 0.5, rows // 2 + 1)
    assert bound == sum(int(N * p) for p in bins[1:])
    out = collate(np.random.default_rng(0), 8)
    assert out["mask_indices"].shape == (2, bound)


def test_seeded_and_deterministic():
    collate = MaskCollator(GRID)
    a = collate(np.random.default_rng(3), 4)
    b = collate(np.random.default_rng(3), 4)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("kwargs", [dict(mask_ratio=(-0.1, 0.5)), dict(mask_ratio=(0.1, 1.5)),
                                    dict(mask_probability=1.2), dict(mask_probability=-0.5)])
def test_ratio_outside_unit_interval_is_a_clear_error(kwargs):
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        MaskCollator(GRID, **kwargs)


def test_other_bad_input():
    with pytest.raises(ValueError, match="min > max"):
        MaskCollator(GRID, mask_ratio=(0.5, 0.1))
    with pytest.raises(ValueError, match="num_groups"):
        MaskCollator(GRID, num_groups=3)(np.random.default_rng(0), 8)
    with pytest.raises(ValueError, match="outside"):
        BlockMaskGenerator(GRID)(np.random.default_rng(0), N + 1)
