"""Whether a sweep can conclude, before it runs: the report's Holm families (the tests it corrects together),
the smallest Holm-adjusted p its seeds can reach, and the smallest paired difference it would detect.

A verdict needs the exact sign-flip test to pass Holm, so n seeds can say something about a family of m tests
only if 2 / 2^n times m is at most ALPHA (paired.sign_flip_floor); the default number of compared seeds is the
fewest that can, for the sweep's largest family. The detectable difference is the one both tests (paired t and
sign-flip, as the report's verdict needs) find with 80% power at Holm's first step (level ALPHA / m), for normal
per-seed differences of the paired seed sd: an assumption until the sweep has run (SEED_SD below, or a pilot's
through --seed-sd). Where the seeds only just allow a verdict, every seed has to agree in sign, which makes it
larger than the t-test's alone.
"""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
from scipy import stats

from experiments import context
from experiments.paired import ALPHA, seeds_needed, sign_flip_floor

POWER = 0.8
# The committed tiny sweeps' paired seed sd of the final test loss (nats; the median over each sweep's comparisons,
# recomputed from experiments/results/<sweep>-tiny by the tests). Byte-level Shakespeare: at other scales an
# assumption to replace with a pilot's.
SEED_SD = {"ladder": 0.0227, "experts": 0.0396, "width_depth": 0.0173, "context": 0.0281, "swiglu": 0.0242}


def families(runs, evaluation: str = "") -> dict[str, int]:
  """{family: number of tests} of the report of a sweep of these runs (sweeps.Run: name, model, baseline)."""
  compared = sum(1 for r in runs if r.baseline)
  out = {"final test loss against the baseline": compared} if compared else {}
  if evaluation == "experiments.context":
    out |= context.families(runs)
  return {name: m for name, m in out.items() if m}


def default_seeds(runs, evaluation: str = "", at_least: int = 2) -> int:
  """The fewest compared seeds with which every family can pass Holm (and at least `at_least`)."""
  return max([at_least] + [seeds_needed(m) for m in families(runs, evaluation).values()])


def detectable(n: int, m: int, sd: float, draws: int = 4000) -> float:
  """The paired difference that both tests (paired t and exact sign-flip) detect with POWER at level ALPHA / m
  (Holm's first step) over n seeds, the per-seed differences normal with sd `sd`: found by bisection on the
  same simulated draws (seeded: the same answer every time); infinite where the sign-flip test cannot pass."""
  if n < 2 or sign_flip_floor(n, m) > ALPHA:
    return math.inf
  z_SxN = np.random.default_rng(0).standard_normal((draws, n))
  signs_PxN = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
  level = ALPHA / m

  def power(shift: float) -> float:  # in units of sd
    d_SxN = z_SxN + shift
    mean_S, se_S = d_SxN.mean(1), d_SxN.std(1, ddof=1) / math.sqrt(n)
    p_t = 2 * stats.t.sf(np.abs(mean_S) / se_S, n - 1)
    p_sign = np.mean(np.abs(d_SxN @ signs_PxN.T) / n >= np.abs(mean_S)[:, None] - 1e-12, axis=1)
    return float(np.mean((p_t <= level) & (p_sign <= level)))

  lo, hi = 0.0, 1.0
  while power(hi) < POWER:
    lo, hi = hi, 2 * hi
  for _ in range(30):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if power(mid) < POWER else (lo, mid)
  return hi * sd


def table(runs, evaluation: str, seeds: int, sd: float, source: str) -> str:
  """The dry-run's lines: per family, its tests, the smallest Holm p at `seeds` seeds and the detectable
  difference at paired sd `sd` (from `source`)."""
  lines = [f"Holm families at {seeds} seeds (paired seed sd {sd:.4f} nats assumed: {source}); a verdict needs "
           f"the smallest Holm p <= {ALPHA:g}:",
           f"  {'family':<58} {'tests':>5} {'smallest Holm p':>16} {f'detectable ({POWER:.0%} power)':>24}"]
  for name, m in families(runs, evaluation).items():
    mde = detectable(seeds, m, sd)
    lines.append(f"  {name:<58} {m:>5} {sign_flip_floor(seeds, m):>16.4f} "
                 + (f"{mde:>19.4f} nats" if math.isfinite(mde) else f"{'cannot conclude':>24}"))
  return "\n".join(lines)


def note(sweep: str, runs, evaluation: str, seeds: int, seed_sd: float) -> None:
  """The dry-run's families table at these seeds (stdout), and a note (stderr) for each family that cannot
  conclude. `seed_sd` 0: the tiny sweep's median paired sd, where there is one."""
  source = "--seed-sd" if seed_sd else f"the tiny {sweep} sweep's median" if sweep in SEED_SD else "none"
  print(table(runs, evaluation, seeds, seed_sd or SEED_SD.get(sweep, math.nan), source))
  for name, m in families(runs, evaluation).items():
    if sign_flip_floor(seeds, m) > ALPHA:
      print(f"note: with {seeds} seeds the sign-flip test cannot pass Holm over the {m} tests of '{name}' (smallest "
            f"adjusted p {sign_flip_floor(seeds, m):.3f}): nothing there can be called distinguishable; "
            f"--seeds {seeds_needed(m)} can", file=sys.stderr)
