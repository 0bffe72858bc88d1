"""A local S3 server (moto) for the bucket-data tests, and how to point s3fs at it.

s3fs (through aiobotocore) takes its endpoint and credentials from the AWS_* environment
variables the fixture sets. Not real S3: say so when quoting these tests.
"""

from __future__ import annotations

import logging
import socket

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

S3_BUCKET = "lvm-test-bucket"


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_in_process(s3_server, monkeypatch):
    """Points this process's `s3://` URLs (fsspec's s3fs) at the local server; yields an s3fs client
    with the bucket S3_BUCKET created."""
    import s3fs

    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": s3_server, "AWS_ENDPOINT_URL_S3": s3_server}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client may point at another server
    fs = s3fs.S3FileSystem()
    if not fs.exists(S3_BUCKET):
        fs.mkdir(S3_BUCKET)
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
