"""Orbax checkpoints of the whole TrainState plus the data iterator's position.

Saving the grain iterator state next to the params is what makes a resumed run
see exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from typing import Any

import grain.python as grain
import jax
import orbax.checkpoint as ocp

from lvm_jax.errors import UserError
from lvm_jax.workdir import as_path


class Checkpointer:
    """`DIR/checkpoints/<step>/{state,data}` (local or gs://); async saves, keeps the newest `keep`."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True):
        if keep < 1:  # orbax reads max_to_keep=0 as "keep none": every save would be deleted
            raise UserError(f"config.keep_checkpoints={keep} would delete every checkpoint; keep at least 1.")
        self.directory = as_path(directory, what="checkpoint directory")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.PyGrainCheckpointHandler(),
            },
        )

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # An error after an async save started (a failing eval, a data error) would end the process
        # with the write half done and the step lost: let it commit first. Never mask the error.
        if exc_type is not None:
            try:
                self.manager.wait_until_finished()
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any | None = None, force: bool = False) -> bool:
        """Starts an (async) save of `state` and the iterator position; returns whether it saved."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.PyGrainCheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
        """Restores into the shapes/shardings of `abstract_state` (a tree of ShapeDtypeStruct)."""
        self.require_step(step)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.PyGrainCheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:
            if "stored shape" not in str(e):
                raise
            detail = str(e).split(". ")[0]  # "Requested shape: (4, 8) is not compatible with the stored shape: (2, 16)"
            raise UserError(f"The checkpoint {self.directory}/{step} was trained with another model config ({detail}); "
                            "use the config the run was trained with (the run's config.json records it).") from e
        return restored["state"]

    def require_step(self, step: int) -> None:
        """Raises a UserError listing the saved steps when `step` has no checkpoint."""
        saved = self.manager.all_steps()
        if step not in saved:
            listed = ", ".join(map(str, sorted(saved))) or "none"
            raise UserError(f"No checkpoint of step {step} in {self.directory} (saved steps: {listed}); "
                            "pass one of those.")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings`, the restore target for `tree`'s shapes."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
