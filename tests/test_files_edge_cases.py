"""Edge cases of lvm_jax.data.files: bucket copies that fail part way."""
from __future__ import annotations

import os

import pytest

from lvm_jax.data import files


class _FailingFS:
  """A bucket client whose copy dies part way, after leaving `left` at the local name it was given."""

  def __init__(self, left: str):
    self.left = left

  def get_file(self, remote: str, local: str) -> None:
    if self.left == "file":
      with open(local, "wb") as f:
        f.write(b"the first half of ")
    else:  # fsspec's generic get_file makes a folder when the remote path is a prefix
      os.makedirs(os.path.join(local, "sub"))
    raise ConnectionResetError("connection reset by peer")


@pytest.mark.parametrize("left", ["file", "folder"])
def test_a_failed_download_leaves_no_partial_copy_and_keeps_its_error(tmp_path, monkeypatch, left):
  monkeypatch.setattr(files, "_fs", lambda url, what="data.path": (_FailingFS(left), url.partition("://")[2]))
  local = tmp_path / "stage" / "emb.npy"
  with pytest.raises(ConnectionResetError, match="connection reset by peer"):
    files.download("gs://bucket/emb.npy", str(local))
  assert os.listdir(local.parent) == []  # no emb.npy.part<pid>.<token> left behind
