"""One supervised train step on a fixed global batch, in 1 or several processes.

Usage: python tests/scripts/distributed_step.py NUM_PROCESSES PROCESS_ID PORT
Prints one JSON line (process 0): the loss and a float64 checksum of the updated params.
Each process feeds only the rows of the global batch its devices hold, through the same
host -> global path the loop uses (`jax.make_array_from_process_local_data`).
"""

import json
import sys

import jax
import numpy as np

num_processes, process_id, port = (int(a) for a in sys.argv[1:4])
if num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                               process_id=process_id)

from lvm_jax import sharding  # noqa: E402
from tests.helpers import tiny_supervised_config  # noqa: E402
from train.loop import abstract_state, compile_train_step, create_state  # noqa: E402
from train.tasks import get_task  # noqa: E402

config = tiny_supervised_config(**{"model.width": 64, "model.mlp_dim": 128, "model.num_heads": 4})
mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
rng = np.random.default_rng(0)
size, batch_size = config.data.image_size, config.batch_size
batch = {"image": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
         "label": rng.integers(0, 10, size=(batch_size,)).astype(np.int32)}

# The rows this process's devices hold (contiguous for a batch-leading sharding).
index_map = sharding.batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
starts = [idx[0].start or 0 for idx in index_map.values()]
stops = [idx[0].stop or batch_size for idx in index_map.values()]
local = {k: v[min(starts):max(stops)] for k, v in batch.items()}

task = get_task(config, mesh)
key = jax.random.PRNGKey(0)
_, shardings = abstract_state(task, mesh, key)
state = create_state(task, shardings, key)
with sharding.mesh_context(mesh):
    global_batch = sharding.host_to_global(local, mesh)
    step = compile_train_step(task, shardings, global_batch, mesh)
    state, metrics = step(state, global_batch)
    checksum = jax.jit(lambda p: sum(jax.numpy.sum(jax.numpy.abs(x)) for x in jax.tree_util.tree_leaves(p)),
                       out_shardings=sharding.replicated(mesh))(state.params)
    loss = float(jax.device_get(metrics["loss"]))
if jax.process_index() == 0:
    print(json.dumps({"loss": loss, "checksum": float(jax.device_get(checksum)),
                      "devices": jax.device_count(), "processes": jax.process_count()}))
