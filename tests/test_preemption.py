"""The loop's order at a step that saves: checkpoint first, then eval; a preempted run is not 'finished'."""

from __future__ import annotations

import json

import pytest

from lvm_jax.errors import PREEMPTED_EXIT_CODE, Preempted
from tests.helpers import tiny_supervised_config
from train import loop
from train.__main__ import main as train_main


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One XLA compile cache for the module: the first run compiles the tiny step, the others load it."""
    return str(tmp_path_factory.mktemp("compile_cache"))


def _config(cache: str, **overrides):
    return tiny_supervised_config(**{"compile_cache_dir": cache, **overrides})


def _checkpoints(workdir):
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _preempt_at(monkeypatch, at_step: int) -> None:
    """As if SIGTERM arrived during step `at_step` (reached() is what the loop asks after each step)."""
    def reached(self, step):
        self.requested = self.requested or step >= at_step
        return self.requested

    monkeypatch.setattr(loop._Preemption, "reached", reached)


def test_sigterm_saves_skips_the_eval_and_exits_143(tmp_path, monkeypatch, capsys, cache):
    _preempt_at(monkeypatch, 2)
    workdir = tmp_path / "w"
    rc = train_main(["--config", "tests/configs/tiny_vit.py", "--workdir", str(workdir),
                     "--config.eval_every=2", "--config.ckpt_every=4", f"--config.compile_cache_dir={cache}"])
    err = capsys.readouterr().err
    # Exit 0 once told a Kubernetes Job or a requeue-on-failure script that the run was done.
    assert rc == PREEMPTED_EXIT_CODE, err[-2000:]
    assert "preempted (SIGTERM): saved the checkpoint of step 2/6" in err
    assert "rerun the same command to resume" in err
    assert _checkpoints(workdir) == [2]
    # The grace period goes to the save: no eval at the preempted step (only the step-0 eval ran).
    assert sorted(p.name for p in (workdir / "eval").glob("step_*.json")) == ["step_00000000.json"]
    assert [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_preemption_at_the_last_step_is_a_finished_run(tmp_path, monkeypatch, cache):
    _preempt_at(monkeypatch, 6)  # total_steps=6: nothing is left to resume
    final = loop.train_and_evaluate(_config(cache), tmp_path / "w")
    assert "top1" in final
    assert _checkpoints(tmp_path / "w")[-1] == 6
    # Rerunning a finished run trains nothing and returns (lvm-train prints) the same final metrics.
    assert loop.train_and_evaluate(_config(cache), tmp_path / "w") == final


def test_a_failing_eval_keeps_the_checkpoint_of_its_step(tmp_path, monkeypatch, cache):
    """The checkpoint is written before the eval: an eval that fails (OOM, an unreadable image) costs no training."""
    from train.tasks.supervised import SupervisedTask

    original = SupervisedTask.evaluate

    def evaluate(self, state, step):
        if step == 3:
            raise RuntimeError("eval exploded at step 3")
        return original(self, state, step)

    monkeypatch.setattr(SupervisedTask, "evaluate", evaluate)
    config = _config(cache, eval_every=3, ckpt_every=3)
    with pytest.raises(RuntimeError, match="eval exploded"):
        loop.train_and_evaluate(config, tmp_path / "w")
    assert _checkpoints(tmp_path / "w") == [3]
    # The rerun resumes at step 3 and runs the eval that never finished before training on.
    monkeypatch.setattr(SupervisedTask, "evaluate", original)
    loop.train_and_evaluate(config, tmp_path / "w")
    evals = sorted(p.name for p in (tmp_path / "w" / "eval").glob("step_*.json"))
    assert evals == ["step_00000000.json", "step_00000003.json", "step_00000006.json"]


def test_preempted_is_raised_to_library_callers(tmp_path, monkeypatch, cache):
    _preempt_at(monkeypatch, 1)
    with pytest.raises(Preempted) as info:
        loop.train_and_evaluate(_config(cache), tmp_path / "w")
    assert info.value.step == 1
