"""grain loaders: per-process sharding, worker processes, prefetch, resumable state.

``make_loader`` wraps ``grain.DataLoader`` + ``IndexSampler``.  The iterator's
``get_state()``/``set_state()`` round-trips exactly: a restored iterator yields
the same subsequent batches, because both the sample order (per-epoch
shuffle) and every record's augmentation generator are functions of
``(seed, shard, position in the sample stream)`` only.
"""
from __future__ import annotations

import time
from typing import Any

import grain.python as grain
import numpy as np
from absl import flags


class ShardedSource:
  """Contiguous slice `shard_index` of `shard_count` of a random-access source.

  drop_remainder=False spreads the remainder over the first shards (eval: every
  record is read exactly once); True gives every shard len(source) //
  shard_count records (train: processes stay in lockstep), so the last
  len(source) % shard_count records are never trained on (for a class-sorted
  folder, the end of the last class: fewer records than processes, per run).  We shard here
  rather than with grain's ShardOptions because grain's finite-epoch loader
  silently drops a record from the larger shards when the split is uneven.
  Attributes of the wrapped source (num_classes, class_names, ...) pass through.
  """

  def __init__(self, source, shard_index: int, shard_count: int, drop_remainder: bool):
    n = len(source)
    base, extra = divmod(n, shard_count)
    if drop_remainder:
      self.start, self.size = shard_index * base, base
    else:
      self.start = shard_index * base + min(shard_index, extra)
      self.size = base + (shard_index < extra)
    self.source = source

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> Any:
    if not 0 <= index < self.size:
      raise IndexError(f"index {index} out of range for a shard of {self.size} records")
    return self.source[self.start + int(index)]

  def __getattr__(self, name: str) -> Any:
    if name.startswith("__") or name == "source":  # keeps pickling from recursing
      raise AttributeError(name)
    return getattr(self.source, name)

  def __repr__(self) -> str:
    return f"ShardedSource({self.source!r}, start={self.start}, size={self.size})"


def _shard_seed(seed: int, shard_index: int) -> int:
  """Distinct 31-bit seeds per shard, so processes draw different augmentations."""
  if shard_index == 0:
    return seed
  return int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0] >> 1)


def make_loader(source, operations, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                num_epochs: int | None = None, shard_index: int = 0, shard_count: int = 1,
                worker_count: int = 0, drop_remainder: bool = True, worker_buffer_size: int = 2,
                prefetch: int = 256, read_threads: int = 8) -> grain.DataLoader:
  """Batches of `source` records transformed by `operations`, for one process.

  Args:
    source: RandomAccessDataSource (``len`` + ``__getitem__``).
    operations: per-record grain transforms (e.g. ``supervised_transforms``).
    batch_size: per-process batch size (global batch / process count).
    shuffle: reshuffle every epoch (seeded); eval uses False.
    seed: 32-bit non-negative int; drives shuffling and augmentation.
    num_epochs: None repeats forever; eval uses 1.
    shard_index, shard_count: this process's disjoint slice of the records
      (``jax.process_index()``, ``jax.process_count()``).
    worker_count: grain worker processes for the transforms (0 = in-process).
    drop_remainder: drop a final partial batch (train True, eval False).
    worker_buffer_size: batches each worker prepares ahead.
    prefetch, read_threads: in-process read-ahead of records (grain ReadOptions).

  Returns:
    a DataLoader; ``iter(loader)`` yields dicts of numpy arrays with a leading
    batch axis and supports ``get_state`` / ``set_state``.
  """
  if batch_size <= 0:
    raise ValueError(f"per-process batch size must be positive, got {batch_size}.")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count}).")
  if len(source) < shard_count:
    raise ValueError(f"data source has {len(source)} records, fewer than the {shard_count} "
                     "processes reading it; use a larger data set.")
  if not 0 <= seed < 2**32:
    raise ValueError(f"data seed must be a non-negative 32-bit integer, got {seed}.")
  if worker_count and not flags.FLAGS.is_parsed():
    # grain's worker pool reads its absl flags; outside an absl app they are
    # unparsed and the read raises.  Their defaults are what we want.
    flags.FLAGS.mark_as_parsed()
  if shard_count > 1:
    source = ShardedSource(source, shard_index, shard_count, drop_remainder)
    seed = _shard_seed(seed, shard_index)
  # grain's per-record generator is Philox(seed + position): deterministic per
  # (seed, record, epoch), which is what makes a restored iterator bit-exact.
  shard_options = grain.NoSharding()
  sampler = grain.IndexSampler(num_records=len(source), shard_options=shard_options,
                               shuffle=shuffle, num_epochs=num_epochs, seed=seed)
  return grain.DataLoader(
      data_source=source,
      sampler=sampler,
      operations=list(operations) + [grain.Batch(batch_size, drop_remainder=drop_remainder)],
      worker_count=worker_count,
      worker_buffer_size=worker_buffer_size,
      shard_options=shard_options,
      read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch),
  )


def loader_options(data_cfg) -> dict[str, int]:
  """make_loader's throughput knobs from the config's data block: ``data.worker_count`` (processes),
  ``data.prefetch`` (batches each worker prepares ahead) and ``data.read_threads`` (record reads in
  flight per process: raise it for data in a bucket, where each read waits on a request)."""
  return dict(worker_count=int(data_cfg.get("worker_count", 0) or 0),
              worker_buffer_size=int(data_cfg.get("prefetch", 2) or 2),
              read_threads=int(data_cfg.get("read_threads", 8) or 8))


def benchmark_loader(loader, num_batches: int = 50, warmup: int = 2) -> float:
  """Images per second the loader delivers over `num_batches` (after `warmup` batches)."""
  it = iter(loader)
  for _ in range(warmup):
    next(it)
  images = 0
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(it)
    images += len(batch["image"])
  return images / (time.perf_counter() - start)
