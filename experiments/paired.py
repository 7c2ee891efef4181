"""Paired comparisons of two runs over the seeds both finished, and their correction for multiplicity.

Each comparison gets two tests of "no difference": the paired t-test, and the exact sign-flip
(permutation) test, which enumerates all 2^n sign patterns of the per-seed differences and assumes no
normality (its smallest two-sided p is 2 / 2^n: 0.0078 at 8 seeds, 0.0625 at 5). Holm's step-down
correction runs over the sweep's comparisons for each test; a difference is called distinguishable only
where both reject. Intervals: the 95% t-interval of the mean difference, and the simultaneous one for the
family (each at level 1 - alpha / m, Bonferroni), which Holm's verdicts do not give.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
from scipy import stats

ALPHA = 0.05


@dataclasses.dataclass(frozen=True)
class Comparison:
  run: str
  baseline: str
  n: int  # seeds both finished
  mean: float  # mean of run - baseline over those seeds (negative: the run is better)
  ci: tuple[float, float]  # 95% t-interval of the mean difference
  p: float  # paired t-test, two-sided
  p_sign: float  # exact sign-flip test, two-sided
  seed_se: float = float("nan")  # standard error of the mean difference over seeds
  heldout_se: float = float("nan")  # the test set's own noise in it: standard error over its batches
  p_holm: float = float("nan")  # t-test p, Holm-adjusted over the sweep's comparisons
  p_sign_holm: float = float("nan")  # sign-flip p, Holm-adjusted
  ci_simultaneous: tuple[float, float] = (float("nan"), float("nan"))  # t-interval at 1 - alpha / m

  @property
  def distinguishable(self) -> bool:
    return self.p_holm <= ALPHA and self.p_sign_holm <= ALPHA

  def cells(self, higher_is_better: bool = False) -> str:
    """n, Δ, 95% CI, both p, both Holm p, the simultaneous interval and the verdict, as table cells; Δ < 0 is
    better (a loss) unless `higher_is_better` (an accuracy)."""
    better = self.mean > 0 if higher_is_better else self.mean < 0
    verdict = (f"**distinguishable: {'better' if better else 'worse'}**" if self.distinguishable
               else "not distinguishable")
    return (f"{self.n} | {self.mean:+.4f} | [{self.ci[0]:+.4f}, {self.ci[1]:+.4f}] | {self.p:.3g} | {self.p_sign:.3g} | "
            f"{self.p_holm:.3g} | {self.p_sign_holm:.3g} | "
            f"[{self.ci_simultaneous[0]:+.4f}, {self.ci_simultaneous[1]:+.4f}] | {verdict} |")


def sign_flip_p(d: np.ndarray) -> float:
  """Exact two-sided p of the mean difference under sign symmetry: the share of the 2^n sign patterns whose
  mean is at least as far from zero as the observed one (the observed pattern counts)."""
  d = np.asarray(d, float)
  signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
  means = np.abs(signs @ d) / len(d)
  return float(np.mean(means >= abs(d.mean()) - 1e-12))


def sign_flip_floor(n: int, m: int) -> float:
  """The smallest Holm-adjusted sign-flip p that n seeds can reach among m comparisons: the smallest exact
  p (every seed one way: 2 of the 2^n patterns) times m. Above ALPHA, no comparison can pass the rule."""
  return min(1.0, m * 2.0 / 2**n)


def seeds_needed(m: int) -> int:
  """The fewest seeds with which the sign-flip test can reject at ALPHA after Holm over m comparisons."""
  return math.ceil(math.log2(2 * m / ALPHA))


def compare(run: str, baseline: str, d: np.ndarray, heldout_se: float = float("nan")) -> Comparison:
  """The uncorrected comparison of per-seed differences d (run - baseline)."""
  n = len(d)
  mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(n))
  half = stats.t.ppf(1 - ALPHA / 2, n - 1) * se
  p = float(2 * stats.t.sf(abs(mean) / se, n - 1)) if se > 0 else (0.0 if mean else 1.0)
  return Comparison(run, baseline, n, mean, (mean - half, mean + half), p, sign_flip_p(d), se, heldout_se)


def holm_adjust(p: list[float]) -> list[float]:
  """Holm's adjusted p-values: sorted ascending, the i-th (from 0) times (m - i), made monotone."""
  m, out, running = len(p), [0.0] * len(p), 0.0
  for rank, i in enumerate(sorted(range(m), key=lambda i: p[i])):
    running = max(running, min(1.0, (m - rank) * p[i]))
    out[i] = running
  return out


def corrected(comparisons: list[Comparison]) -> list[Comparison]:
  """Holm over both tests, and the family's simultaneous intervals; in the input order."""
  m = len(comparisons)
  holm_t, holm_sign = holm_adjust([c.p for c in comparisons]), holm_adjust([c.p_sign for c in comparisons])
  out = []
  for c, pt, ps in zip(comparisons, holm_t, holm_sign):
    half = stats.t.ppf(1 - ALPHA / (2 * m), c.n - 1) * c.seed_se
    out.append(dataclasses.replace(c, p_holm=pt, p_sign_holm=ps, ci_simultaneous=(c.mean - half, c.mean + half)))
  return out
