"""grain pipelines over a prepared token stream: packed fixed-length windows of seq_len + 1 tokens,
shuffled per epoch for a seed, sharded across hosts, batched; the iterator state is checkpointable."""

from __future__ import annotations

from pathlib import Path

import grain
import numpy as np

from gptoss_jax.config import ConfigError
from gptoss_jax.data.prepare import load_meta


class TokenWindows:
  """Random access to non-overlapping windows [i * L, i * L + L + 1) of a token file (memory-mapped)."""

  def __init__(self, path: Path, dtype: str, seq_len: int):
    self.tokens = np.memmap(path, dtype=dtype, mode="r")
    self.seq_len = seq_len
    self.n = (len(self.tokens) - 1) // seq_len

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> np.ndarray:
    start = int(i) * self.seq_len
    return np.asarray(self.tokens[start:start + self.seq_len + 1], np.int32)


def windows(folder: str | Path, split: str, seq_len: int) -> TokenWindows:
  meta = load_meta(folder)
  source = TokenWindows(Path(folder) / f"{split}.bin", meta["dtype"], seq_len)
  if len(source) == 0:
    raise ConfigError(f"{folder}/{split}.bin holds {len(source.tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
  return source


def train_dataset(folder, seq_len: int, local_batch: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """Infinite: each epoch a new permutation; host p takes every process_count-th window from p."""
  ds = grain.MapDataset.source(windows(folder, "train", seq_len)).repeat().shuffle(seed=seed)
  ds = ds[process_index::process_count].batch(local_batch, drop_remainder=True)
  return ds.to_iter_dataset()


def eval_batches(folder, seq_len: int, local_batch: int, n_batches: int, process_index: int = 0,
                 process_count: int = 1) -> list[np.ndarray]:
  """The same held-out batches every time, in order: n_batches of them (repeating the split if it is
  short), or with n_batches = 0 the whole split once (what does not fill a last global batch left out)."""
  source = windows(folder, "val", seq_len)
  if n_batches == 0:
    n_batches = len(source) // (local_batch * process_count)
    if n_batches == 0:
      raise ConfigError(f"{folder}/val.bin holds {len(source)} windows of {seq_len} tokens, fewer than one "
                        f"batch of {local_batch * process_count}")
  ds = grain.MapDataset.source(source).repeat()
  ds = ds[process_index::process_count].batch(local_batch, drop_remainder=True)
  return [ds[i] for i in range(n_batches)]
