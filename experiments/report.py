"""python -m experiments.report <sweep folder> [--out DIR]

Reads the sweep's sweep.json and every run's metrics.jsonl; writes report.md (the table, and which
differences are larger than the seed-to-seed spread) and PNG plots: eval loss against steps and against
training FLOPs, and the final loss of each run with its spread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from experiments.run import metrics



@dataclasses.dataclass
class Result:
  name: str
  spec: dict  # the run's entry in sweep.json
  curves: list[list[tuple[int, float]]]  # per seed: (step, eval loss)
  finals: list[float]  # per finished seed: eval loss at the last step
  tokens_per_s: float  # median over seeds and logged intervals (the first, which compiles, left out)
  peak_memory_gb: float
  wall_s: float  # mean over seeds

  @property
  def mean(self) -> float:
    return statistics.fmean(self.finals) if self.finals else float("nan")

  @property
  def sd(self) -> float:
    return statistics.stdev(self.finals) if len(self.finals) > 1 else float("nan")


def load(sweep_dir: Path) -> tuple[dict, list[Result]]:
  description = json.loads((sweep_dir / "sweep.json").read_text())
  results = []
  for spec in description["runs"]:
    curves, finals, rates, peaks, walls = [], [], [], [], []
    for folder in sorted((sweep_dir / spec["name"]).glob("seed*")):
      rows = metrics(folder)
      curve = sorted((r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r)
      if not curve:
        continue
      curves.append(curve)
      if curve[-1][0] >= spec["steps"]:
        finals.append(curve[-1][1])
      perf = [r for r in rows if "perf/tokens_per_s" in r]
      rates += [r["perf/tokens_per_s"] for r in perf[1:]]
      peaks += [r["perf/peak_memory_gb"] for r in perf if "perf/peak_memory_gb" in r]
      walls += [max(r["perf/elapsed_s"] for r in perf)] if perf and "perf/elapsed_s" in perf[-1] else []
    results.append(Result(spec["name"], spec, curves, finals, statistics.median(rates) if rates else float("nan"),
                          max(peaks, default=float("nan")), statistics.fmean(walls) if walls else float("nan")))
  return description, results


def compare(result: Result, baseline: Result) -> tuple[float, bool | None]:
  """(difference of mean final losses, whether it is larger than the seed-to-seed spread: the two runs'
  ranges over seeds do not overlap). None when either run has fewer than two finished seeds."""
  delta = result.mean - baseline.mean
  if len(result.finals) < 2 or len(baseline.finals) < 2:
    return delta, None
  return delta, max(result.finals) < min(baseline.finals) or min(result.finals) > max(baseline.finals)


def baseline_of(result: Result, results: list[Result]) -> Result | None:
  named = result.spec["baseline"]
  if named == "best":
    best = min((r for r in results if r.finals), key=lambda r: r.mean, default=None)
    return None if best is result else best
  return next((r for r in results if r.name == named), None)


def markdown(description: dict, results: list[Result]) -> str:
  first = description["runs"][0]
  lines = [f"# Sweep `{description['sweep']}`, scale `{description['scale']}`", "",
           f"{len(results)} runs x {description['seeds']} seeds, {first['steps']} steps of "
           f"{first['tokens_per_step']:,} tokens"
           + (f"; overrides: {' '.join(f'{k}={v}' for k, v in description['overrides'].items())}"
              if description["overrides"] else "") + ".",
           "Final eval loss: held-out cross-entropy (nats/token) at the last step, mean ± standard deviation "
           "over seeds [min, max]. Δ: against the run named in `vs` (the previous rung, the dense model, "
           "or the best run of the sweep). *beyond spread*: the two runs' ranges over seeds do not overlap.", "",
           "| run | changes | final eval loss | [min, max] | vs | Δ | beyond spread | params | active | "
           "train FLOPs/token | tokens/s | peak memory GiB | wall s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  verdicts = []
  for r in results:
    base = baseline_of(r, results)
    delta, beyond = compare(r, base) if base and r.finals and base.finals else (None, None)
    mark = {True: "**yes**", False: "no", None: "n/a"}[beyond]
    if base and beyond is not None:
      verdicts.append((r.name, base.name, delta, beyond))
    finals = (f"{r.mean:.4f} ± {r.sd:.4f}" if len(r.finals) > 1 else f"{r.mean:.4f}") if r.finals else \
        f"unfinished ({len(r.curves)} seeds started)"
    lines.append(
        f"| {r.name} | {', '.join(r.spec['changes']) or '-'} | {finals} | "
        + (f"[{min(r.finals):.4f}, {max(r.finals):.4f}]" if r.finals else "-")
        + f" | {base.name if base else '-'} | {'-' if delta is None else f'{delta:+.4f}'} | {mark} | "
        f"{r.spec['total_params']:,} | "
        f"{r.spec['active_params']:,} | {r.spec['flops_per_token']:,.0f} | {r.tokens_per_s:,.0f} | "
        f"{r.peak_memory_gb:.2f} | {r.wall_s:.0f} |")
  lines += ["", "## Differences larger than the seed-to-seed spread", ""]
  beyond = [f"- `{a}` vs `{b}`: {d:+.4f} ({'better' if d < 0 else 'worse'})" for a, b, d, ok in verdicts if ok]
  within = [f"`{a}` vs `{b}` ({d:+.4f})" for a, b, d, ok in verdicts if not ok]
  lines += beyond or ["- none"]
  lines += ["", "Within the spread (not distinguishable at this scale and seed count): "
            + (", ".join(within) if within else "none") + "."]
  lines += ["", "![eval loss against steps](loss_vs_steps.png)", "![eval loss against training FLOPs]"
            "(loss_vs_flops.png)", "![final eval loss per run](final_loss.png)", ""]
  return "\n".join(lines)


def plot(description: dict, results: list[Result], out: Path) -> list[Path]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  paths = []
  for name, x_label, scale in (("loss_vs_steps", "step", None), ("loss_vs_flops", "training FLOPs", "log")):
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    colors = plt.get_cmap("tab20")(np.arange(len(results)) % 20)
    for r, color in zip(results, colors):
      steps = sorted({s for curve in r.curves for s, _ in curve})
      if not steps:
        continue
      per_step = [[dict(c)[s] for c in r.curves if s in dict(c)] for s in steps]
      mean = np.array([np.mean(v) for v in per_step])
      x = np.array(steps, float)
      if scale:
        x = x * r.spec["tokens_per_step"] * r.spec["flops_per_token"]
      ax.plot(x, mean, label=r.name, linewidth=1.2, color=color)
      ax.fill_between(x, [min(v) for v in per_step], [max(v) for v in per_step], color=color, alpha=0.15)
    if scale:
      ax.set_xscale(scale)
    ax.set_xlabel(x_label)
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title(f"{description['sweep']} ({description['scale']}): mean over seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _set_tail_ylim(ax, results)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png")
    plt.close(fig)
    paths.append(out / f"{name}.png")

  done = [r for r in results if r.finals]
  fig, ax = plt.subplots(figsize=(8, 0.4 * len(done) + 1.5), dpi=100)
  y = np.arange(len(done))[::-1]
  means = np.array([r.mean for r in done])
  ax.errorbar(means, y, xerr=[means - [min(r.finals) for r in done], [max(r.finals) for r in done] - means],
              fmt="o", capsize=3)
  for yi, r in zip(y, done):
    ax.scatter(r.finals, [yi] * len(r.finals), s=8, color="gray", zorder=3)
  ax.set_yticks(y, [r.name for r in done])
  ax.set_xlabel("final eval loss (nats/token): mean, min..max, seeds in gray")
  ax.set_title(f"{description['sweep']} ({description['scale']})")
  ax.grid(alpha=0.3, axis="x")
  fig.tight_layout()
  fig.savefig(out / "final_loss.png")
  plt.close(fig)
  return paths + [out / "final_loss.png"]


def _set_tail_ylim(ax, results: list[Result]) -> None:
  """Zoom on the part of training where runs differ: from the best final loss to the loss all runs
  had reached a quarter of the way in."""
  finals = [v for r in results for v in r.finals]
  quarter = [c[len(c) // 4][1] for r in results for c in r.curves if c]
  if finals and quarter:
    lo, hi = min(finals), max(quarter)
    ax.set_ylim(lo - 0.05 * (hi - lo), hi)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
  parser.add_argument("sweep_dir", help="the folder experiments.run wrote (holds sweep.json)")
  parser.add_argument("--out", default="", help="where report.md and the plots go (default: the sweep folder)")
  args = parser.parse_args(argv)
  sweep_dir = Path(args.sweep_dir)
  if not (sweep_dir / "sweep.json").is_file():
    print(f"error: {sweep_dir} is not a sweep folder (no sweep.json; experiments.run writes it)", file=sys.stderr)
    return 2
  description, results = load(sweep_dir)
  if not any(r.curves for r in results):
    print(f"error: no run in {sweep_dir} has evaluated yet", file=sys.stderr)
    return 2
  out = Path(args.out) if args.out else sweep_dir
  out.mkdir(parents=True, exist_ok=True)
  (out / "report.md").write_text(markdown(description, results))
  plot(description, results, out)
  print(f"wrote {out / 'report.md'} and loss_vs_steps.png, loss_vs_flops.png, final_loss.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
