"""sharding.to_host on a tree sharded across processes (fsdp over 2 hosts), in 1 or several processes.

Usage: python tests/scripts/to_host.py NUM_PROCESSES PROCESS_ID PORT
Every process checks the gathered values and prints one JSON line.
"""

import json
import sys

import jax
import numpy as np

num_processes, process_id, port = (int(a) for a in sys.argv[1:4])
if num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                               process_id=process_id)

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from lvm_jax import sharding  # noqa: E402

mesh = Mesh(np.asarray(jax.devices()), ("fsdp",))  # one axis over every device of every process
values = {"kernel": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "scale": np.float32(2.5)}
tree = {"kernel": jax.make_array_from_callback((16, 3), NamedSharding(mesh, P("fsdp")),
                                               lambda index: values["kernel"][index]),
        "norm": {"scale": jax.device_put(values["scale"], NamedSharding(mesh, P()))}}
device_get_fails = False
try:
    jax.device_get(tree["kernel"])  # what DINOv2's pictures did on process 0
except RuntimeError:
    device_get_fails = True
host = sharding.to_host(tree)
assert isinstance(host["kernel"], np.ndarray) and isinstance(host["norm"]["scale"], np.ndarray)
np.testing.assert_array_equal(host["kernel"], values["kernel"])
assert float(host["norm"]["scale"]) == 2.5
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                  "fully_addressable": tree["kernel"].is_fully_addressable, "device_get_fails": device_get_fails,
                  "sum": float(host["kernel"].sum())}))
