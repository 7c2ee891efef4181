"""grain pipelines over a prepared token stream: packed fixed-length windows of seq_len + 1 tokens,
shuffled per epoch for a seed, sharded across hosts, batched; the iterator state is checkpointable."""

from __future__ import annotations

from pathlib import Path

import grain
import numpy as np

from gptoss_jax.config import ConfigError
from gptoss_jax.data.prepare import load_meta


class TokenWindows:
  """Random access to the non-overlapping windows of seq_len + 1 tokens of a split's shards (memory-mapped):
  shard k's windows [i * L, i * L + L + 1) for i < (len(shard) - 1) // L, shard after shard."""

  def __init__(self, shards: list[np.ndarray], seq_len: int):
    self.shards, self.seq_len = shards, seq_len
    counts = [max(len(s) - 1, 0) // seq_len for s in shards]
    self.ends = np.cumsum(counts)
    self.n = int(self.ends[-1]) if counts else 0

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> np.ndarray:
    k = int(np.searchsorted(self.ends, int(i), side="right"))
    start = (int(i) - (int(self.ends[k - 1]) if k else 0)) * self.seq_len
    return np.asarray(self.shards[k][start:start + self.seq_len + 1], np.int32)


def shards(folder: str | Path, split: str) -> list[np.ndarray]:
  """A prepared split's shards, memory-mapped, in order."""
  meta = load_meta(folder)
  if split not in meta["splits"]:
    raise ConfigError(f"{folder} has no {split!r} split (splits: {', '.join(meta['splits'])})")
  return [np.memmap(Path(folder) / s["file"], dtype=meta["dtype"], mode="r") for s in meta["splits"][split]["shards"]]


def split_tokens(folder: str | Path, split: str) -> np.ndarray:
  """A prepared split's whole token stream (its shards concatenated, read into memory)."""
  return np.concatenate(shards(folder, split))


def windows(folder: str | Path, split: str, seq_len: int) -> TokenWindows:
  source = TokenWindows(shards(folder, split), seq_len)
  if len(source) == 0:
    raise ConfigError(f"the {split} split of {folder} holds no window of seq_len + 1 = {seq_len + 1} tokens")
  return source


def train_dataset(folder, seq_len: int, local_batch: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """Infinite: each epoch a new permutation; host p takes every process_count-th window from p."""
  ds = grain.MapDataset.source(windows(folder, "train", seq_len)).repeat().shuffle(seed=seed)
  ds = ds[process_index::process_count].batch(local_batch, drop_remainder=True)
  return ds.to_iter_dataset()


def eval_batches(folder, seq_len: int, local_batch: int, n_batches: int, process_index: int = 0,
                 process_count: int = 1, split: str = "val") -> list[np.ndarray]:
  """The same held-out batches of a split (`val` or `test`) every time, in order, no window twice: n_batches
  of them, or as many as the split fills if it holds fewer (n_batches = 0: all of them; what does not fill a
  last global batch is left out). A split read twice over would count its windows twice in the loss's
  standard error, understating the test set's own noise."""
  source = windows(folder, split, seq_len)
  full = len(source) // (local_batch * process_count)
  if full == 0:
    raise ConfigError(f"the {split} split of {folder} holds {len(source)} windows of {seq_len} tokens, fewer "
                      f"than one batch of {local_batch * process_count}")
  ds = grain.MapDataset.source(source)[process_index::process_count].batch(local_batch, drop_remainder=True)
  return [ds[i] for i in range(min(n_batches, full) if n_batches else full)]
