"""A local GCS server (gcp-storage-emulator) for the bucket tests, and how to point clients at it.

Every client lvm_jax uses talks to it: gcsfs (etils' backend, and the data readers') through
STORAGE_EMULATOR_HOST, tensorstore (orbax's array writes) through TENSORSTORE_GCS_HTTP_URL, and
array_record's reader (TFDS data in a bucket) through CLOUD_STORAGE_EMULATOR_ENDPOINT.
Not real GCS: say so when quoting these tests.
"""

from __future__ import annotations

import os
import socket

import pytest

from tests.helpers import ROOT

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

BUCKET = "lvm-test-bucket"


def _send_generation_on_download() -> None:
    """Makes the emulator's object downloads carry `x-goog-generation`, as GCS's do.

    tensorstore reads the object generation from that header (it is how OCDBT's manifest
    updates stay consistent); without it every read of a rewritten manifest fails.
    """
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    original = objects.download
    if getattr(original, "sends_generation", False):
        return

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
        except NotFound:  # the original handler answers 404
            pass
        return original(request, response, storage, *args, **kwargs)

    download.sends_generation = True
    objects.download = download  # objects.get(alt=media) calls it by this name
    for _, methods in server.HANDLERS:
        for method, handler in methods.items():
            if handler is original:
                methods[method] = download


@pytest.fixture(scope="module")
def emulator():
    from gcp_storage_emulator.server import create_server

    _send_generation_on_download()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(emulator):
    from gcsfs.core import GCSFileSystem  # the JSON-API client (no gRPC bucket-type probe, see env)

    return GCSFileSystem(endpoint_url=emulator, token="anon")


@pytest.fixture
def gcs_in_process(emulator, bucket, monkeypatch):
    """Points this process's `gs://` URLs (fsspec's gcsfs) at the emulator; yields the bucket client."""
    import gcsfs

    if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
        pytest.skip("gcsfs was imported with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT on (see tests/conftest.py)")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", emulator)  # array_record's GCS reader
    gcsfs.GCSFileSystem.clear_instance_cache()  # a cached client may point at another emulator
    yield bucket
    gcsfs.GCSFileSystem.clear_instance_cache()


def env(emulator: str, devices: int = 2, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "STORAGE_EMULATOR_HOST": emulator, "TENSORSTORE_GCS_HTTP_URL": emulator,
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": emulator,  # array_record's GCS reader (google-cloud-cpp)
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator-accepts-any-token",
            # gcsfs would first ask GCS's gRPC control API for the bucket type, which the emulator
            # does not serve (a 60 s timeout per bucket access); the JSON API is all it needs.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", **extra}


