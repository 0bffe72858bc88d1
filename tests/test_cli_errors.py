"""Bad input gives one clear line (exit 2), never a traceback from deep inside JAX."""

from __future__ import annotations

import pathlib

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


def test_nan_loss_stops_with_a_clear_message(tmp_path, capsys):
    rc, err = _train(tmp_path, "--config.optim.lr=1e30", "--config.optim.clip_norm=0", "--config.total_steps=4",
                     "--config.ckpt_every=0", "--config.optim.warmup_steps=0", capsys=capsys)
    assert rc == 2
    assert "The loss became nan" in err and "keeping the last good checkpoint" in err
    assert not (tmp_path / "w" / "checkpoints" / "4").exists()
