"""Count-based n-gram baselines: interpolated Kneser-Ney language models of orders 1 to 8, counted on
windows of training tokens and scored on the windows a training evaluates, in nats per token.

A window of seq_len + 1 tokens predicts its tokens 1..seq_len from those before it in the window, as the
networks do; contexts reaching back past a window's start see a boundary symbol (an n-gram model's
sentence-start padding). Each order interpolates with the one below it, down to a uniform distribution
over the vocabulary: the highest order uses raw counts, the lower ones continuation counts (in how many
distinct left contexts a continuation was seen), each order with its own discount D = n1 / (n1 + 2 n2)
(n1, n2: how many of its counts are 1 and 2). n-grams are keyed by a 64-bit rolling hash of their tokens.
"""

from __future__ import annotations

import numpy as np

MAX_ORDER = 8
_P = np.uint64(0x9E3779B97F4A7C15)  # odd multipliers of the rolling hashes (64-bit, wrapping)
_Q = np.uint64(0xC2B2AE3D27D4EB4F)


def _context_keys(windows: np.ndarray, order: int) -> list[np.ndarray]:
  """keys[k][i, t]: hash of the k tokens before target t + 1 of window i (nearest first), k = 0..order;
  positions before a window's start hash as the boundary symbol."""
  n, width = windows.shape
  padded = np.concatenate([np.full((n, order), -1, np.int64), windows.astype(np.int64)], axis=1)
  tokens = (padded + 1).astype(np.uint64)  # 0 is the boundary
  targets = np.arange(order + 1, order + width)  # padded columns of tokens 1..seq_len
  keys = [np.full((n, width - 1), 0x5BD1E995, np.uint64)]
  with np.errstate(over="ignore"):
    for k in range(1, order + 1):
      keys.append(keys[-1] * _P + tokens[:, targets - k])
  return keys


def _pair(context: np.ndarray, target: np.ndarray) -> np.ndarray:
  with np.errstate(over="ignore"):
    return context * _Q + (target.astype(np.uint64) + np.uint64(1))


class _Table:
  """One order's counts: count(h, w), and per context h the total and the number of distinct w."""

  def __init__(self, contexts: np.ndarray, pairs: np.ndarray, weights: np.ndarray | None = None):
    # pairs are unique with `weights` their counts (continuation counts), or repeated with weights None
    if weights is None:
      pairs, first, weights = np.unique(pairs, return_index=True, return_counts=True)
      contexts = contexts[first]
    self.pairs, self.pair_counts = pairs, weights
    self.contexts, inverse = np.unique(contexts, return_inverse=True)
    self.totals = np.bincount(inverse, weights=weights).astype(np.float64)
    self.types = np.bincount(inverse).astype(np.float64)
    n1, n2 = np.sum(weights == 1), np.sum(weights == 2)
    self.discount = float(n1 / (n1 + 2 * n2)) if n1 + n2 else 0.75

  @staticmethod
  def _find(table: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    i = np.minimum(np.searchsorted(table, keys), max(len(table) - 1, 0))
    return i, (table[i] == keys) if len(table) else np.zeros(keys.shape, bool)

  def interpolate(self, contexts: np.ndarray, pairs: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """P(w | h) = max(c(h, w) - D, 0) / c(h) + D * types(h) / c(h) * lower(w | shorter h); lower where h
    was never seen."""
    i, seen = self._find(self.contexts, contexts)
    j, found = self._find(self.pairs, pairs)
    count = np.where(found, self.pair_counts[j], 0).astype(np.float64)
    total, types = np.where(seen, self.totals[i], 1.0), np.where(seen, self.types[i], 0.0)
    p = np.maximum(count - self.discount, 0) / total + self.discount * types / total * lower
    return np.where(seen, p, lower)


class KneserNey:
  """An interpolated Kneser-Ney model of one order, counted on windows of tokens ([n, seq_len + 1])."""

  def __init__(self, windows: np.ndarray, order: int, vocab_size: int):
    if not 1 <= order <= MAX_ORDER:
      raise ValueError(f"order must be in 1..{MAX_ORDER}, got {order}")
    self.order, self.vocab_size = order, vocab_size
    keys = _context_keys(windows, order)
    target = windows[:, 1:]
    self.tables = []
    for k in range(order):  # context length k: order k + 1
      pairs = _pair(keys[k], target).ravel()
      if k == order - 1:  # the highest order: raw counts
        self.tables.append(_Table(keys[k].ravel(), pairs))
      else:  # continuation counts: distinct left tokens before (h, w) (a boundary counts as one)
        left = _pair(keys[k + 1], target).ravel()  # the same n-gram with its left token
        by = np.lexsort((left, pairs))
        p, e, c = pairs[by], left[by], keys[k].ravel()[by]
        distinct = np.ones(len(p), bool)
        distinct[1:] = (p[1:] != p[:-1]) | (e[1:] != e[:-1])
        unique, first, counts = np.unique(p[distinct], return_index=True, return_counts=True)
        self.tables.append(_Table(c[distinct][first], unique, counts))

  def probabilities(self, windows: np.ndarray) -> np.ndarray:
    """P(token t | the tokens before it in its window) for t = 1..seq_len of every window: [n, seq_len]."""
    keys = _context_keys(windows, self.order)
    target = windows[:, 1:]
    p = np.full(target.shape, 1.0 / self.vocab_size)
    for k, table in enumerate(self.tables):
      p = table.interpolate(keys[k], _pair(keys[k], target), p)
    return p

  def loss(self, windows: np.ndarray) -> float:
    """Mean cross-entropy, nats per token."""
    return float(-np.mean(np.log(self.probabilities(windows))))


def baselines(train_windows: np.ndarray, test_windows: np.ndarray, vocab_size: int,
              orders=range(1, MAX_ORDER + 1)) -> dict[int, float]:
  """Test loss (nats per token) of the Kneser-Ney model of each order counted on `train_windows`."""
  return {n: KneserNey(train_windows, n, vocab_size).loss(test_windows) for n in orders}


MAX_TOKENS = 20_000_000  # counting past this many training tokens is left out (memory, and minutes of numpy)


def sweep_baselines(sweep_dir, progress: bool = True) -> dict | None:
  """The baselines of a sweep, kept in <sweep>/ngram.json (computed once, from the sweep's prepared dataset):
  every order's test loss counted on the windows one training sees (compared seed 0's draw of its steps'
  batches) and on the whole training split, on the test windows the trainings evaluate. None where the
  sweep's trainings have no config yet; a training split past MAX_TOKENS is counted on its first MAX_TOKENS."""
  import json
  from pathlib import Path

  from gptoss_jax.config import RunConfig
  from gptoss_jax.data.pipeline import eval_batches, train_dataset, windows
  from gptoss_jax.data.prepare import ensure_dataset, load_meta
  path = Path(sweep_dir) / "ngram.json"
  if path.is_file():
    kept = json.loads(path.read_text())
    return kept | {k: {int(n): v for n, v in kept[k].items()} for k in ("seen", "whole")}
  configs = sorted(Path(sweep_dir).glob("*/seed0/config.json"))
  if not configs:
    return None
  config = RunConfig.from_dict(json.loads(configs[0].read_text()))
  d, t = config.data, config.train
  folder = ensure_dataset(d, progress)
  test = np.concatenate(eval_batches(folder, d.seq_len, t.batch_size, t.eval_batches, split="test"))
  per_batch = t.batch_size * (d.seq_len + 1)
  batches = iter(train_dataset(folder, d.seq_len, t.batch_size, seed=0))
  seen = np.concatenate([next(batches) for _ in range(min(t.steps, MAX_TOKENS // per_batch))])
  source = windows(folder, "train", d.seq_len)
  whole = np.stack([source[i] for i in range(min(len(source), MAX_TOKENS // (d.seq_len + 1)))])
  vocab = load_meta(folder)["vocab_size"]
  result = {"split": "test", "seed": 0, "seen_tokens": int(seen[:, 1:].size), "whole_tokens": int(whole[:, 1:].size),
            "seen": baselines(seen, test, vocab), "whole": baselines(whole, test, vocab)}
  path.write_text(json.dumps(result, indent=1))
  return result
