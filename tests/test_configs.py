"""Every shipped training config builds: the task, its model's parameter tree and its optimizer
(abstractly, with jax.eval_shape: nothing of ViT-L size is allocated)."""

from __future__ import annotations

import ast
import pathlib

import jax
import pytest

from lvm_jax import sharding
from lvm_jax.config import load_config_file
from train.loop import abstract_state
from train.tasks import get_task

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py") if not p.name.startswith("curate_"))
# Configs that need a data set to count their classes build on the synthetic source here.
OVERRIDES = {"vit_finetune.py": {"source": "synthetic"}}


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_config_builds_its_task_model_and_optimizer(name):
    path = ROOT / "configs" / name
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "lvm-train --config configs/" + name in docstring.replace("\\\n", " "), "the docstring states the command"
    config = load_config_file(str(path))
    config.data.update(OVERRIDES.get(name, {}))
    mesh = sharding.make_mesh({"data": -1})
    task = get_task(config, mesh)
    task.total_steps = 100_000  # the schedules need a run length; epoch-counted configs need the data set for it
    abstract, shardings = abstract_state(task, mesh, jax.random.PRNGKey(0))
    params = jax.tree_util.tree_leaves(abstract.params)
    assert params and all(x.dtype == jax.numpy.float32 for x in params), name  # float32 master weights
    assert len(jax.tree_util.tree_leaves(shardings.params)) == len(params)  # every parameter is placed


def test_a_string_field_keeps_numeric_looking_text():
    from lvm_jax.config import load_config

    config = load_config(str(ROOT / "configs" / "vit_synthetic.py"), ["data.path=2024", "data.source=synthetic"])
    assert config.data.path == "2024"


def test_numeric_fields_take_inf_and_refuse_booleans():
    from lvm_jax.config import load_config
    from lvm_jax.errors import UserError

    config = load_config(str(ROOT / "configs" / "vit_synthetic.py"), ["optim.clip_norm=inf"])
    assert config.optim.clip_norm == float("inf")
    for override in ("optim.lr=True", "total_steps=False"):  # ConfigDict took them as 1 and 0
        with pytest.raises(UserError, match="expects a (float|int) but got '(True|False)'; pass a number"):
            load_config(str(ROOT / "configs" / "vit_synthetic.py"), [override])


def test_config_args_split_and_a_second_or_empty_config_is_refused():
    from lvm_jax.config import split_config_args
    from lvm_jax.errors import UserError

    assert split_config_args(["--config", "a.py", "--config.optim.lr", "0.1", "--workdir", "w"]) == (
        "a.py", ["optim.lr=0.1"], ["--workdir", "w"])
    assert split_config_args(["--config=a.py", "--config", "a.py"])[0] == "a.py"  # the same file twice is fine
    # A second file silently replaced the first; a trailing --config became argparse's "unrecognized arguments".
    with pytest.raises(UserError, match=r"--config was given twice \('a.py' and 'b.py'\); pass one config file"):
        split_config_args(["--config", "a.py", "--workdir", "w", "--config=b.py"])
    for argv in (["--workdir", "w", "--config"], ["--config", "--workdir", "w"], ["--config="]):
        with pytest.raises(UserError, match="--config needs a config file"):
            split_config_args(argv)
