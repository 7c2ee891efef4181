"""The n-gram baselines against a plain interpolated Kneser-Ney written with dicts, and their sanity."""

from collections import Counter, defaultdict

import numpy as np
import pytest

from experiments.ngram import KneserNey

BOUNDARY = None


def brute_force_kn(train: list[list[int]], order: int, vocab: int):
  """P(w | context) by the textbook recursion, counting over every (context, word) of the windows; the
  context of a window's first tokens is padded with a boundary symbol. Returns a function."""
  events = []  # (full context tuple of order - 1 tokens, nearest last, word)
  for w in train:
    padded = [BOUNDARY] * (order - 1) + w
    for t in range(order, len(padded)):  # targets 1..: the window's tokens after its first
      events.append((tuple(padded[t - order + 1:t]), padded[t], padded[t - order] if t - order >= 0 else BOUNDARY))
  levels = []
  for k in range(order):  # context = the last k tokens
    counts = Counter()
    if k == order - 1:
      for ctx, word, _ in events:
        counts[(ctx[len(ctx) - k:] if k else (), word)] += 1
    else:
      lefts = defaultdict(set)
      for w in train:
        padded = [BOUNDARY] * order + w
        for t in range(order + 1, len(padded)):
          ctx = tuple(padded[t - k:t]) if k else ()
          lefts[(ctx, padded[t])].add(padded[t - k - 1])
      counts = Counter({key: len(v) for key, v in lefts.items()})
    n1 = sum(1 for c in counts.values() if c == 1)
    n2 = sum(1 for c in counts.values() if c == 2)
    d = n1 / (n1 + 2 * n2) if n1 + n2 else 0.75
    total, types = Counter(), Counter()
    for (ctx, _), c in counts.items():
      total[ctx] += c
      types[ctx] += 1
    levels.append((counts, total, types, d))

  def prob(context: tuple, word: int) -> float:
    p = 1.0 / vocab
    for k, (counts, total, types, d) in enumerate(levels):
      ctx = context[len(context) - k:] if k else ()
      if total[ctx]:
        p = max(counts[(ctx, word)] - d, 0) / total[ctx] + d * types[ctx] / total[ctx] * p
    return p
  return prob


def test_kneser_ney_matches_the_textbook_recursion_and_sums_to_one():
  rng = np.random.default_rng(0)
  vocab = 6
  train = rng.choice(vocab, size=(40, 9), p=[0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
  test = rng.choice(vocab, size=(5, 9))
  for order in (1, 2, 3, 4):
    model = KneserNey(train, order, vocab)
    want = brute_force_kn(train.tolist(), order, vocab)
    got = model.probabilities(test)
    for i, window in enumerate(test.tolist()):
      padded = [BOUNDARY] * order + window
      for t in range(1, len(window)):
        ctx = tuple(padded[order + t - order + 1:order + t])
        assert got[i, t - 1] == pytest.approx(want(ctx, window[t]), rel=1e-9), (order, i, t)
    # a distribution: over every next token, each context's probabilities sum to 1
    probe = np.repeat(test[:1], vocab, axis=0)
    probe[:, 5] = np.arange(vocab)
    assert model.probabilities(probe)[:, 4].sum() == pytest.approx(1.0, abs=1e-9)
  with pytest.raises(ValueError, match="order"):
    KneserNey(train, 9, vocab)


def test_higher_orders_win_on_text_with_structure():
  text = np.frombuffer(("the cat sat on the mat. " * 200).encode(), np.uint8).astype(np.int64)
  windows = text[: 33 * 140].reshape(140, 33)
  losses = [KneserNey(windows[:120], n, 256).loss(windows[120:]) for n in (1, 2, 4)]
  assert losses[0] > losses[1] > losses[2] and losses[0] < np.log(256)
