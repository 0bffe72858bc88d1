"""Schedules vs a NumPy transcription of DINOv2's CosineScheduler (dinov2/utils/utils.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lvm_jax import schedules as S


def np_cosine_scheduler(base, final, total, warmup=0, start_warmup=0.0):
    """The reference: a precomputed array, `final` past the end."""
    warm = np.linspace(start_warmup, base, warmup)
    iters = np.arange(total - warmup)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters))) if len(iters) else iters
    table = np.concatenate([warm, cos])
    return lambda it: table[it] if it < total else final


@pytest.mark.parametrize("base,final,total,warmup,start", [
    (4e-3, 1e-6, 100, 10, 0.0),     # lr
    (0.04, 0.4, 50, 0, 0.0),         # weight decay
    (0.992, 1.0, 80, 0, 0.0),        # teacher momentum
    (0.07, 0.07, 30, 30, 0.04),      # teacher temperature: warmup only
    (1.0, 0.0, 7, 1, 0.5),           # one warmup step (linspace of length 1)
])
def test_matches_dinov2_cosine_scheduler(base, final, total, warmup, start):
    ours = S.WarmupCosine(base, final, total, warmup_steps=warmup, start_warmup_value=start)
    ref = np_cosine_scheduler(base, final, total, warmup, start)
    steps = np.arange(total + 5)
    got = np.array([float(ours(int(s))) for s in steps])
    np.testing.assert_allclose(got, [ref(int(s)) for s in steps], rtol=1e-6, atol=1e-7)
    # the same object works on traced steps inside jit and as an optax schedule
    np.testing.assert_allclose(jax.jit(jax.vmap(ours))(jnp.asarray(steps)), got, rtol=1e-6, atol=1e-7)


def test_recipe_factories():
    total = 1000
    mom = S.teacher_momentum(total)
    assert float(mom(0)) == pytest.approx(0.992) and float(mom(total)) == 1.0
    assert 0.992 < float(mom(total // 2)) < 1.0
    wd = S.dinov2_weight_decay(total)
    assert float(wd(0)) == pytest.approx(0.04) and float(wd(total)) == pytest.approx(0.4)
    assert float(wd(total // 2)) == pytest.approx(0.22, abs=1e-6)
    temp = S.teacher_temperature(300)
    assert float(temp(0)) == pytest.approx(0.04) and float(temp(299)) == pytest.approx(0.07)
    assert float(temp(150)) == pytest.approx(0.04 + 0.03 * 150 / 299)
    assert float(temp(5000)) == pytest.approx(0.07)
    lr = S.dinov2_lr(4e-3, 1e-6, total, 100)
    assert float(lr(0)) == 0.0 and float(lr(99)) == pytest.approx(4e-3)
    assert float(lr(total)) == pytest.approx(1e-6)
    last = S.dinov2_last_layer_lr(4e-3, 1e-6, total, 100, freeze_steps=50)
    # zeroed, not shifted (DINOv2: schedule[:freeze] = 0)
    assert all(float(last(s)) == 0.0 for s in range(50))
    assert all(float(last(s)) == pytest.approx(float(lr(s))) for s in range(50, 200, 7))


def test_generic_decays_and_optax():
    lin = S.WarmupCosine(1.0, 0.0, 10, warmup_steps=0, decay="linear")
    np.testing.assert_allclose([float(lin(s)) for s in range(11)], [1 - s / 10 for s in range(10)] + [0.0],
                               atol=1e-7)
    const = S.WarmupCosine(0.5, 0.5, 10, warmup_steps=3, decay="constant")
    assert [float(const(s)) for s in (0, 1, 2, 5, 20)] == [0.0, 0.25, 0.5, 0.5, 0.5]
    opt = optax.sgd(S.dinov2_lr(0.1, 0.0, 10, 2))
    state = opt.init(jnp.zeros(2))
    updates, _ = opt.update(jnp.ones(2), state)
    assert float(updates[0]) == 0.0  # step 0 of the warmup


def test_bad_schedules_are_clear_errors():
    with pytest.raises(ValueError, match="exceeds total_steps"):
        S.WarmupCosine(1.0, 0.0, 10, warmup_steps=11)
    with pytest.raises(ValueError, match="negative"):
        S.WarmupCosine(1.0, 0.0, -1)
    with pytest.raises(ValueError, match="decay="):
        S.WarmupCosine(1.0, 0.0, 10, decay="exp")
