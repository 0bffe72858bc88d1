"""Bad input gives one clear line (exit 2), never a traceback from deep inside JAX."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from train.__main__ import main as train_main

CONFIG = "tests/configs/tiny_vit.py"


def _train(tmp_path, *overrides, capsys):
    rc = train_main(["--config", CONFIG, "--workdir", str(tmp_path / "w"), *overrides])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["--config.optim.lrr=1e-3"], "Unknown config key 'optim.lrr'. Did you mean 'optim.lr'?"),
    (["--config.batch_size=12"], "config.batch_size=12 is not divisible by the data-parallel size 8"),
    (["--config.mesh.data=16"], "needs 16 devices but only 8 are available"),
    (["--config.task=vae"], "config.task='vae' is unknown"),
    (["--config.data.source=folder", "--config.data.path=/nonexistent/pets"], "/nonexistent/pets"),
    (["--config.optim.lr=fast"], "Config key 'optim.lr' expects a float"),
    (["--config.keep_checkpoints=0"], "config.keep_checkpoints=0 must be >= 1"),
    (["--config.log_every=0"], "config.log_every=0 must be >= 1"),
    (["--config.total_steps=-5"], "config.total_steps=-5 must be >= 0"),
    # 16 rows in micro-batches of 4 over 8 data-parallel devices: each micro-batch would be resharded.
    (["--config.optim.grad_accum=4"], "config.optim.grad_accum=4 must split config.batch_size=16"),
])
def test_bad_config_is_one_clear_line(tmp_path, capsys, overrides, message):
    rc, err = _train(tmp_path, *overrides, capsys=capsys)
    assert rc == 2
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_config_file(tmp_path, capsys):
    assert train_main(["--config", "configs/nope.py", "--workdir", str(tmp_path)]) == 2
    assert "configs/nope.py" in capsys.readouterr().err


@pytest.mark.parametrize("url, fix", [
    ("s3://my-bucket/run", "s3:// is not supported here (gs:// and local paths are)"),
    ("http://host/run", "http:// is not supported"),
])
def test_an_unsupported_url_workdir_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, url, fix):
    """pathlib would make s3://b/run a local directory s3:/b/run on every host: refuse it, name the fix."""
    from tests.helpers import ROOT

    monkeypatch.chdir(tmp_path)
    rc = train_main(["--config", str(ROOT / CONFIG), "--workdir", url])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert fix in err and "mount" in err and "/mnt/" in err
    assert not any(tmp_path.iterdir())  # no local 's3:' directory


def _folder(root: pathlib.Path, per_class: int = 12, corrupt: int = 0) -> pathlib.Path:
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
        for i in range(corrupt):
            (root / c / f"bad{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    rc, err = _train(tmp_path, "--config.data.source=folder", f"--config.data.path={tmp_path / 'data'}",
                     capsys=capsys)
    assert rc == 2 and str(tmp_path / "data") in err and "Traceback" not in err


def test_corrupt_jpeg_is_skipped_or_named(tmp_path, capsys):
    data = _folder(tmp_path / "data", corrupt=2)
    common = ["--config.data.source=folder", f"--config.data.path={data}", "--config.model.num_classes=None",
              "--config.total_steps=2", "--config.ckpt_every=0", "--config.optim.warmup_steps=1",
              "--config.batch_size=8", "--config.eval_batch_size=8",
              f"--config.compile_cache_dir={tmp_path / 'cc'}"]  # the second run loads the first's programs
    rc, err = _train(tmp_path, *common, capsys=capsys)
    assert rc == 0, err
    assert "undecodable images were skipped" in err
    rc, err = _train(tmp_path / "raise", *common, "--config.data.decode_errors=raise", capsys=capsys)
    assert rc == 2 and "bad" in err and "Traceback" not in err


def test_a_config_that_does_not_fit_the_checkpoints_is_one_line_and_keeps_config_json(tmp_path, capsys):
    """Resuming or evaluating with a changed model (a forgotten training override) or a step that is not
    on disk: one line naming the fix (it was orbax's traceback), and the run's config.json stays its record."""
    import json

    from train.evaluate import main as eval_main

    cache = f"--config.compile_cache_dir={tmp_path / 'cc'}"
    rc, err = _train(tmp_path, "--config.total_steps=3", "--config.ckpt_every=1", "--config.keep_checkpoints=1",
                     cache, capsys=capsys)
    assert rc == 0, err
    record = (tmp_path / "w" / "config.json").read_text()
    rc, err = _train(tmp_path, "--config.total_steps=4", "--config.model.mlp_dim=128", cache, capsys=capsys)
    assert rc == 2 and "was trained with another model config" in err and "config.json" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "w" / "config.json").read_text() == record
    assert json.loads(record)["model"]["mlp_dim"] == 64
    workdir = ["--config", CONFIG, "--workdir", str(tmp_path / "w")]
    assert eval_main(workdir + ["--config.model.num_heads=4"]) == 2
    err = capsys.readouterr().err
    assert "was trained with another model config" in err
    assert "warning: the model config differs from" in err and "model.num_heads=4 (trained: 2)" in err
    import train.loop

    def no_task(*args, **kwargs):
        raise AssertionError("the task (and an epoch-counted run's train listing) was built before the step check")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.loop, "get_task", no_task)
        assert eval_main(workdir + ["--step", "1"]) == 2  # deleted by keep_checkpoints=1
    err = capsys.readouterr().err
    assert "No checkpoint of step 1 in" in err and "(saved steps: 3)" in err
    assert eval_main(["--config", CONFIG, "--workdir", str(tmp_path / "typo")]) == 2
    assert not (tmp_path / "typo").exists()


def test_nan_loss_stops_with_a_clear_message(tmp_path, capsys):
    rc, err = _train(tmp_path, "--config.optim.lr=1e30", "--config.optim.clip_norm=0", "--config.total_steps=4",
                     "--config.ckpt_every=0", "--config.optim.warmup_steps=0", capsys=capsys)
    assert rc == 2
    # lr 1e30: the first update blows the weights up; the next step's loss is huge and its gradient inf.
    assert "The loss became" in err and "(gradient norm inf) at step 2" in err and "no checkpoint saved yet" in err
    assert not (tmp_path / "w" / "checkpoints" / "4").exists()


def test_infinite_gradient_under_a_finite_loss_stops_before_it_is_saved(tmp_path, capsys, monkeypatch):
    # The loss is computed before the update; an inf gradient makes the clipped update NaN while the
    # logged loss is still finite, and the next checkpoint would keep the NaN params.
    from train.tasks.supervised import SupervisedTask

    original = SupervisedTask.train_step

    def step_with_inf_gradient(self, state, batch):
        state, metrics = original(self, state, batch)
        return state, {**metrics, "grad_norm": jnp.where(state.step >= 2, jnp.inf, metrics["grad_norm"])}

    monkeypatch.setattr(SupervisedTask, "train_step", step_with_inf_gradient)
    rc, err = _train(tmp_path, "--config.total_steps=4", "--config.ckpt_every=1", "--config.log_every=1",
                     capsys=capsys)
    assert rc == 2 and "gradient norm inf) at step 2" in err and "last good checkpoint (step 1)" in err, err
    assert not (tmp_path / "w" / "checkpoints" / "2").exists()


def test_a_tensor_axis_spanning_processes_is_refused(monkeypatch):
    # 2 processes, mesh (data 1, fsdp 1, tensor 8): both processes would hold the one batch slice
    # and each would feed it different rows.
    import jax

    from lvm_jax import sharding
    from lvm_jax.errors import UserError

    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(UserError, match="keep the mesh's tensor axis within one host"):
        sharding.check_batch_size(16, mesh)
    assert sharding.check_batch_size(16, sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})) == 8
