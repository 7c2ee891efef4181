"""A sweep report's figures (PNG), one function each: loss against steps and against training FLOPs, the final
loss of every run with its seeds, the paired differences with their intervals, the learning-rate grids, and
the MoE runs' router load over training. The n-gram baselines, where given, are drawn as horizontal lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.folders import choose_lr


def plot(description: dict, results: list, comparisons: list, out: Path, baselines: dict | None = None) -> list[Path]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  title = f"{description.sweep} ({description.scale})"
  colors = plt.get_cmap("tab20")(np.arange(len(results)) % 20)
  lines = _baseline_lines(baselines)
  paths = [_curves(plt, results, colors, title, lines, out, flops) for flops in (False, True)]
  paths += [_finals(plt, results, title, lines, out), _differences(plt, comparisons, title, out),
            _lr_grids(plt, results, colors, title, out)]
  if any(r.load_curves for r in results):
    paths.append(_router(plt, results, colors, title, out))
  return paths


def _baseline_lines(baselines: dict | None) -> list[tuple[float, str]]:
  """The best n-gram on one training's tokens and on the whole training split: (loss, label)."""
  if not baselines:
    return []
  out = []
  for key, what in (("seen", "a training's tokens"), ("whole", "the whole training split")):
    order = min(baselines[key], key=baselines[key].get)
    out.append((baselines[key][order], f"best n-gram on {what} (order {order})"))
  return out


def _draw_baselines(ax, lines, vertical: bool = False) -> None:
  for (loss, label), style in zip(lines, ("--", ":")):
    (ax.axvline if vertical else ax.axhline)(loss, color="black", linewidth=0.9, linestyle=style, label=label)


def _curves(plt, results, colors, title, lines, out: Path, flops: bool) -> Path:
  fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
  for r, color in zip(results, colors):
    steps = sorted({s for curve in r.curves.values() for s, _ in curve})
    if not steps:
      continue
    per_step = [[dict(c)[s] for c in r.curves.values() if s in dict(c)] for s in steps]
    x = np.array(steps, float) * (r.spec.tokens_per_step * r.spec.flops_per_token if flops else 1)
    ax.plot(x, [np.mean(v) for v in per_step], label=r.name, linewidth=1.2, color=color)
    ax.fill_between(x, [min(v) for v in per_step], [max(v) for v in per_step], color=color, alpha=0.15)
  _draw_baselines(ax, lines)
  if flops:
    ax.set_xscale("log")
  ax.set(xlabel="training FLOPs" if flops else "step", ylabel="validation loss (nats/token)",
         title=f"{title}: mean over seeds, band = min..max")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  _set_tail_ylim(ax, results, lines)
  return _save(plt, fig, out / ("loss_vs_flops.png" if flops else "loss_vs_steps.png"))


def _finals(plt, results, title, lines, out: Path) -> Path:
  done = [r for r in results if r.finals]
  fig, ax = plt.subplots(figsize=(8, 0.4 * len(done) + 1.5), dpi=100)
  y = np.arange(len(done))[::-1]
  means = np.array([r.mean for r in done])
  ax.errorbar(means, y, xerr=[means - [min(r.finals.values()) for r in done],
                              [max(r.finals.values()) for r in done] - means], fmt="o", capsize=3)
  for yi, r in zip(y, done):
    ax.scatter(list(r.finals.values()), [yi] * len(r.finals), s=8, color="gray", zorder=3)
  _draw_baselines(ax, lines, vertical=True)
  ax.set_yticks(y, [r.name for r in done])
  ax.set(xlabel="final loss (nats/token): mean, min..max, seeds in gray", title=title)
  ax.grid(alpha=0.3, axis="x")
  if lines:
    ax.legend(fontsize=7)
  return _save(plt, fig, out / "final_loss.png")


def _differences(plt, comparisons, title, out: Path) -> Path:
  fig, ax = plt.subplots(figsize=(8, 0.4 * len(comparisons) + 1.5), dpi=100)
  y = np.arange(len(comparisons))[::-1]
  for yi, c in zip(y, comparisons):
    color = "tab:blue" if c.distinguishable and c.mean < 0 else "tab:red" if c.distinguishable else "gray"
    ax.plot(c.ci_simultaneous, [yi, yi], color=color, linewidth=1, alpha=0.5)
    ax.plot(c.ci, [yi, yi], color=color, linewidth=3)
    ax.plot([c.mean], [yi], "o", color=color)
  ax.axvline(0, color="black", linewidth=0.8)
  ax.set_yticks(y, [f"{c.run} vs {c.baseline}" for c in comparisons])
  ax.set(xlabel="paired difference in final loss (run - vs): thick 95% CI, thin simultaneous CI",
         title=f"{title}\nblue better, red worse (distinguishable after Holm), gray not distinguishable")
  ax.grid(alpha=0.3, axis="x")
  return _save(plt, fig, out / "differences.png")


def _lr_grids(plt, results, colors, title, out: Path) -> Path:
  fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
  for r, color in zip(results, colors):
    if r.grid:
      lrs = sorted(r.grid)
      ax.plot(lrs, [r.grid[lr] for lr in lrs], "o-", label=r.name, color=color, markersize=3)
      ax.plot([choose_lr(r.grid).lr], [min(r.grid.values())], "*", color=color, markersize=10)
  ax.set_xscale("log")
  ax.set(xlabel="peak learning rate", ylabel="final validation loss, mean of the selection seeds",
         title=f"{title}: chosen value starred")
  ax.grid(alpha=0.3)
  if any(r.grid for r in results):
    ax.legend(fontsize=7, ncol=2)
  return _save(plt, fig, out / "lr_grid.png")


def _router(plt, results, colors, title, out: Path) -> Path:
  fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
  for r, color in zip(results, colors):
    if not r.load_curves:
      continue
    collapse = r.spec.collapse
    steps = sorted({s for curve in r.load_curves.values() for s, _ in curve})
    per_step = [[dict(c)[s] / collapse for c in r.load_curves.values() if s in dict(c)] for s in steps]
    ax.plot(steps, [np.mean(v) for v in per_step], label=r.name, linewidth=1.2, color=color)
    ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], color=color, alpha=0.15)
  ax.axhline(0.5, color="black", linewidth=0.8, linestyle="--")
  ax.set(xlabel="step", ylabel="worst layer's max_load_ratio / collapse value",
         title=f"{title}: router load of the compared seeds (mean, band = min..max)\n"
               "1 = collapse (E / top_k), top_k / E = balanced, dashed: half of collapse")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  return _save(plt, fig, out / "router_health.png")


def _save(plt, fig, path: Path) -> Path:
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def _set_tail_ylim(ax, results, lines) -> None:
  """Zoom on the part of training where runs differ: from the best final loss (or baseline) to the loss all
  runs had reached a quarter of the way in."""
  finals = [v for r in results for v in r.finals.values()] + [loss for loss, _ in lines]
  quarter = [c[len(c) // 4][1] for r in results for c in r.curves.values() if c]
  if finals and quarter and max(quarter + finals) > min(finals):
    lo, hi = min(finals), max(quarter + finals)
    ax.set_ylim(lo - 0.05 * (hi - lo), hi)
