"""The one training loop: init sharded state, restore, step, log, eval, save.

Reads top to bottom in labelled sections. Everything task-specific lives in
`train/tasks/<task>.py`; this file only moves batches, state and metrics.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from lvm_jax import compile_cache
from lvm_jax import data as lvm_data
from lvm_jax import sharding
from lvm_jax import workdir as run_dir
from lvm_jax.checkpoint import Checkpointer
from lvm_jax.config import config_to_json
from lvm_jax.errors import Preempted, UserError
from train.tasks import get_task


class _Preemption:
    """SIGTERM -> save a checkpoint, then stop (`Preempted`); `reached(step)` is checked after every step.

    One process: a Python handler sets a flag. Several processes: the signal may reach one
    host only, or the hosts at different steps, and a host that stopped to save alone would
    wait at the checkpoint's barrier while the others wait in the next step's collectives.
    There JAX's preemption service (started by jax.distributed.initialize; it catches SIGTERM
    itself, so no Python handler may replace its own) agrees on one step at which every
    process saves and stops.
    """

    def __init__(self):
        self.requested = False
        self.several = jax.process_count() > 1
        self._previous = None
        if self.several:
            return
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside some test runners)
            pass

    def __enter__(self) -> "_Preemption":
        return self

    def __exit__(self, *exc) -> None:
        # A library caller's process must stay terminable by SIGTERM after training returns.
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def reached(self, step: int) -> bool:
        """Must be called by every process after every step (the service counts steps)."""
        if self.several and not self.requested:
            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested


def _to_float(tree: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def check_loop_settings(config: ml_collections.ConfigDict) -> None:
    """Refuses loop settings that would silently do nothing or fail late (after data indexing and
    compilation): a negative run length, log_every < 1, negative intervals, keeping no checkpoint."""
    minimum = {"total_steps": 0, "total_epochs": 0, "log_every": 1, "eval_every": 0, "ckpt_every": 0,
               "keep_checkpoints": 1}
    for key, low in minimum.items():
        value = config.get(key)
        if value is not None and value < low:
            meaning = {"eval_every": " (0 = only at the end)", "ckpt_every": " (0 = only at the end)",
                       "total_steps": " (0 = count the run in total_epochs)"}.get(key, "")
            raise UserError(f"config.{key}={value} must be >= {low}{meaning}.")


def resolve_total_steps(config: ml_collections.ConfigDict, num_train: int) -> int:
    if config.get("total_steps"):
        return int(config.total_steps)
    if config.get("total_epochs"):
        return max(1, int(math.ceil(config.total_epochs * num_train / config.batch_size)))
    raise UserError("Set config.total_steps or config.total_epochs.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Runs (or resumes) training in `workdir` (a local path or gs:// URL); returns the final eval metrics.

    A SIGTERM before the last step saves a checkpoint and raises `lvm_jax.errors.Preempted`
    (lvm-train exits 143): the run is not finished, and calling this again resumes it.

    Compiled programs are kept in XLA's persistent cache (config.compile_cache_dir,
    default `workdir/compile_cache`): rerunning the command loads them instead of compiling.
    """
    workdir = run_dir.as_path(workdir)
    config = with_default_index_dir(config, workdir)
    with compile_cache.use(config.get("compile_cache_dir", ""), workdir) as cache_dir:
        compile_cache.start_counting()
        # Installed first: a SIGTERM during setup still ends in a clean save.
        with _Preemption() as preempt:
            return _train_and_evaluate(config, workdir, cache_dir, preempt)


def with_default_index_dir(config: ml_collections.ConfigDict, workdir: epath.Path) -> ml_collections.ConfigDict:
    """`config` with data.index_dir defaulting to `workdir/webdataset_index` for webdataset data.

    The member index of every shard is then built once per run, not at every restart: after a
    preemption the run resumes without rescanning its shards (a full read of the data set when they
    are in a bucket), and a pod's hosts share the scanning (lvm_jax.data.captions).
    """
    data = config.get("data") or {}
    if data.get("source") != "webdataset" or data.get("index_dir"):
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.index_dir = os.fspath(workdir / "webdataset_index")
    return config


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.Path,
                        cache_dir: epath.Path | None, preempt: _Preemption) -> dict[str, float]:
    is_main = jax.process_index() == 0
    check_loop_settings(config)

    # --- Workdir and mesh --------------------------------------------------------------------
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(config.get("mesh", {"data": -1}))
    local_batch = sharding.check_batch_size(int(config.batch_size), mesh)
    task = get_task(config, mesh)

    # --- Data ----------------------------------------------------------------------------------
    train_source = task.train_source()
    total_steps = resolve_total_steps(config, len(train_source))
    loader = lvm_data.make_loader(
        train_source, task.train_transforms(), batch_size=local_batch, shuffle=True,
        seed=int(config.get("seed", 0)), num_epochs=None,
        shard_index=jax.process_index(), shard_count=jax.process_count(), drop_remainder=True,
        **lvm_data.loader_options(config.data))
    train_iter = iter(loader)
    task.total_steps = total_steps
    task.workdir = workdir

    # --- State: created already sharded, or restored -------------------------------------------
    rng = jax.random.PRNGKey(int(config.get("seed", 0)))
    # Init is traced outside the mesh context: the boxes only record logical names, and
    # jit's out_shardings place every leaf (flax's flat DenseGeneral init cannot take
    # sharding constraints on its 2-D temporary kernel).
    abstract, state_shardings = abstract_state(task, mesh, rng)
    state = None
    with sharding.mesh_context(mesh), \
            Checkpointer(workdir / "checkpoints", keep=int(config.get("keep_checkpoints", 3))) as checkpointer:
        start_step = checkpointer.latest_step()
        if start_step is None:
            state = create_state(task, state_shardings, rng)
            start_step = 0
            if config.get("init_from"):
                with run_dir.local_copy(config.init_from, what="config.init_from") as init_from:
                    state = task.load_pretrained(state, init_from)
        else:
            state = checkpointer.restore(start_step, restore_target(abstract, state_shardings), train_iter)
            if is_main:
                print(f"Resumed from {checkpointer.directory}/{start_step}")
        if is_main:  # only now: a resume whose config cannot load the checkpoints keeps the run's record
            run_dir.write_whole(workdir / "config.json", config_to_json(config))

        # --- Compiled step ---------------------------------------------------------------------
        first = next(train_iter)
        train_step = compile_train_step(task, state_shardings, first, mesh)

        # --- Loop ------------------------------------------------------------------------------
        log_every = int(config.get("log_every", 50))
        eval_every = int(config.get("eval_every", 0)) or total_steps
        ckpt_every = int(config.get("ckpt_every", 0)) or total_steps
        metrics_log = run_dir.MetricsLog(workdir / "metrics.jsonl", start_step) if is_main else None
        warned: set[str] = set()  # health-warning kinds already printed
        eval_metrics: dict[str, float] = {}

        def run_eval(step: int) -> dict[str, float]:
            result = task.evaluate(state, step)
            if result and is_main:
                record = {"step": step, **result}
                run_dir.write_json(workdir / "eval" / f"step_{step:08d}.json", record)
                run_dir.write_json(workdir / "eval" / "latest.json", record)
                tqdm.write("eval " + " ".join(f"{k}={v:.4f}" for k, v in result.items()) + f" (step {step})")
            return result

        if start_step == 0:
            eval_metrics = run_eval(0)
        elif start_step % eval_every == 0 or start_step == total_steps:
            # A step saves before it evaluates, so a run stopped between the two (a failing eval, a
            # kill, a preemption) resumes here without that eval: run it now. A finished run's rerun
            # reads its final metrics back.
            eval_metrics = _saved_eval(workdir, start_step)
            if eval_metrics is None:
                eval_metrics = run_eval(start_step)

        bar = tqdm(total=total_steps, initial=start_step, disable=not is_main, desc=f"{task.name}",
                   unit="step", dynamic_ncols=True)
        last_time, last_step = time.perf_counter(), start_step
        preempted_at = None
        batch = first
        step = start_step
        while step < total_steps:
            if batch is None:
                batch = next(train_iter)
            global_batch = sharding.host_to_global(batch, mesh)
            state, metrics = train_step(state, global_batch)
            batch = None
            step += 1
            bar.update(1)

            must_log = step % log_every == 0 or step == total_steps
            preempted = preempt.reached(step)  # every step, before any short-circuit
            must_save = step % ckpt_every == 0 or step == total_steps or preempted
            if must_log or must_save:
                values = _to_float(metrics)
                # grad_norm too: an inf gradient under a finite loss turns the params NaN (clipping
                # divides by the norm), and the next checkpoint would keep them.
                if not all(math.isfinite(v) for k, v in values.items() if k in ("loss", "grad_norm")):
                    checkpointer.wait()
                    if metrics_log is not None:
                        metrics_log.flush()
                    kept = checkpointer.latest_step()
                    kept = "(no checkpoint saved yet)" if kept is None else \
                        f"and keeping the last good checkpoint (step {kept})"
                    raise UserError(
                        f"The loss became {values.get('loss')} (gradient norm {values.get('grad_norm')}) at step "
                        f"{step}; stopping {kept}. Lower config.optim.lr or set config.optim.clip_norm.")
                now = time.perf_counter()
                values["img_per_s"] = (step - last_step) * int(config.batch_size) / max(now - last_time, 1e-9)
                last_time, last_step = now, step
                if is_main:
                    metrics_log.append({"step": step, **values})
                    for warning in task.health_warnings(step, values):
                        kind = warning.split(":", 1)[0]
                        if kind not in warned:
                            warned.add(kind)
                            tqdm.write(f"warning (step {step}): {warning}")
                    bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['img_per_s']:.0f}")
            # Save before the eval: an eval that fails (OOM, a bad image) then costs no training, the
            # eval overlaps the asynchronous write, and a preempted run spends its grace period saving.
            if must_save:
                checkpointer.save(step, state, train_iter, force=True)
                if metrics_log is not None:
                    metrics_log.flush()
            if preempted and step < total_steps:
                preempted_at = step
                break
            if step % eval_every == 0 or step == total_steps:
                eval_metrics = run_eval(step)
        bar.close()
        checkpointer.close()
        if is_main:
            print(compile_cache.summary(cache_dir))

    skipped = lvm_data.transforms.decode_failures()
    if skipped:  # counted in this process (worker processes log their own warnings)
        print(f"warning: {skipped} undecodable images were skipped (config.data.decode_errors='skip').",
              file=sys.stderr)

    if is_main and metrics_log.records:
        _plot_history(workdir, metrics_log.records)
    if preempted_at is not None:
        raise Preempted(preempted_at, total_steps, str(checkpointer.directory))
    return eval_metrics


def _warn_if_model_differs(config: ml_collections.ConfigDict, recorded: epath.Path) -> None:
    """Warns when config.model differs from the run's config.json: a change that keeps every parameter
    shape (pool, act, norm eps, ...) would be evaluated silently as another function."""
    if jax.process_index() != 0 or not recorded.exists():
        return
    try:
        trained = json.loads(recorded.read_text()).get("model", {})
    except (OSError, ValueError):
        return
    given = json.loads(config_to_json(config)).get("model", {})

    def flat(d: dict, prefix: str = "model.") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(trained), flat(given)
    differ = [f"{k}={b.get(k)!r} (trained: {a.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if differ:
        print(f"warning: the model config differs from {recorded}: {'; '.join(differ[:8])}"
              + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
              + "; evaluating with the given one.", file=sys.stderr)


def _saved_eval(workdir: epath.Path, step: int) -> dict[str, float] | None:
    """The metrics of the eval at `step` in `workdir/eval`, or None when it never finished.

    Process 0 decides for all (the others must run the collective eval with it or not at all).
    """
    path = workdir / "eval" / f"step_{step:08d}.json"
    found = path.exists() if jax.process_index() == 0 else False
    if jax.process_count() > 1:
        found = bool(multihost_utils.broadcast_one_to_all(np.int32(found)))
    if not found:
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # a process that cannot read process 0's file
        return {}
    return {k: v for k, v in record.items() if k != "step"}


def abstract_state(task, mesh, rng: jax.Array) -> tuple[Any, Any]:
    """(boxed abstract TrainState, its NamedShardings) without allocating anything."""
    abstract = jax.eval_shape(task.init_state, rng)
    return abstract, sharding.state_shardings(abstract, mesh)


def create_state(task, state_shardings: Any, rng: jax.Array) -> Any:
    """Initialises the TrainState directly into its shardings (no host-side full copy)."""
    return jax.jit(lambda r: _unbox(task.init_state(r)), out_shardings=state_shardings)(rng)


def restore_target(abstract: Any, state_shardings: Any) -> Any:
    """ShapeDtypeStructs with the state's shardings: what orbax restores into."""
    import flax.linen as nn

    # Strip the boxes structurally (nn.meta.unbox would apply sharding constraints to abstract values).
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    plain = jax.tree_util.tree_map(lambda x: x.value if is_box(x) else x, abstract, is_leaf=is_box)
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), plain, state_shardings)


def compile_train_step(task, state_shardings: Any, example_batch: dict[str, Any], mesh) -> Any:
    """`task.train_step` under jit with explicit shardings and the state donated."""
    batch_shardings = {k: sharding.batch_sharding(mesh) for k in example_batch}
    return jax.jit(task.train_step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def _unbox(tree: Any) -> Any:
    import flax.linen as nn

    return nn.meta.unbox(tree)


def _plot_history(workdir: epath.Path, history: list[dict[str, float]]) -> None:
    """DIR/plots/train.png: loss and lr over steps, and eval metrics if any."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is a nicety, never a reason to fail a run
        return
    evals = []
    for f in sorted((workdir / "eval").glob("step_*.json")):
        evals.append(json.loads(f.read_text()))
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(13 if evals else 9, 3.2))
    axes[0].plot(steps, [h["loss"] for h in history])
    axes[0].set(title="train loss", xlabel="step")
    axes[1].plot(steps, [h.get("lr", np.nan) for h in history])
    axes[1].set(title="learning rate", xlabel="step")
    if evals:
        keys = [k for k in evals[-1] if k != "step"]
        for k in keys:
            axes[2].plot([e["step"] for e in evals], [e.get(k, np.nan) for e in evals], marker="o", label=k)
        axes[2].set(title="eval", xlabel="step")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    run_dir.save_figure(fig, workdir / "plots" / "train.png")
    plt.close(fig)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                        step: int | None = None) -> dict[str, float]:
    """Restores the latest (or given) checkpoint in `workdir` (a path or gs:// URL) and runs the task's evals."""
    workdir = run_dir.as_path(workdir)
    if not (workdir / "checkpoints").exists():  # checked first: the Checkpointer would create it
        raise UserError(f"No checkpoint in {workdir / 'checkpoints'}; train first with lvm-train --workdir {workdir}.")
    # The checkpoint is looked up before the task is built: a run counted in epochs lists its whole train
    # set below, minutes on a bucket, which a mistyped --step should not wait for.
    checkpointer = Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise UserError(f"No checkpoint in {workdir / 'checkpoints'}; train first with lvm-train --workdir "
                            f"{workdir}.")
        checkpointer.require_step(step)
        _warn_if_model_differs(config, workdir / "config.json")
        config = with_default_index_dir(config, workdir)
        mesh = sharding.make_mesh(config.get("mesh", {"data": -1}))
        task = get_task(config, mesh)
        # The schedules (and their warmup check) need the training run's length, as in train_and_evaluate;
        # a run counted in epochs needs the train set's size for it.
        num_train = len(task.train_source()) if config.get("total_epochs") and not config.get("total_steps") else 0
        task.total_steps = resolve_total_steps(config, num_train)
        task.workdir = workdir
        rng = jax.random.PRNGKey(0)
        abstract, shardings = abstract_state(task, mesh, rng)
        # The training run's cache holds its eval programs.
        with sharding.mesh_context(mesh), compile_cache.use(config.get("compile_cache_dir", ""), workdir):
            state = checkpointer.restore(step, restore_target(abstract, shardings))
            result = task.evaluate(state, step)
    finally:
        checkpointer.close()
    if jax.process_index() == 0:
        run_dir.write_json(workdir / "eval" / f"lvm_eval_step_{step:08d}.json", {"step": step, **result})
    return result
