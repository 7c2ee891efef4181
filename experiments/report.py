"""python -m experiments.report <sweep folder> [--out DIR] [--tensorboard]

Reads the sweep's sweep.json and every training's metrics.jsonl; writes report.md and PNG plots:
- each run's learning rate (every grid value's held-out loss; a best value at the grid's edge flagged);
- its final held-out loss over the compared seeds, budgets (tokens per active and per total parameter,
  training FLOPs per token), speed and memory; router health for mixtures of experts;
- every comparison fixed before the runs (a run against its baseline), seed by seed: the mean paired
  difference, its 95% t-interval, the p-value of a paired t-test, and Holm's correction over all the
  comparisons of the sweep. A difference is called distinguishable only when Holm's test rejects it
  (then its corrected interval excludes zero); everything else is "not distinguishable";
- the held-out set's own noise (standard error over its batches) beside the seed-to-seed spread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from experiments.run import choose_lr, final_test, metrics, selection_losses

ALPHA = 0.05


@dataclasses.dataclass
class Result:
  name: str
  spec: dict  # the run's entry in sweep.json
  curves: dict[int, list[tuple[int, float]]]  # seed -> (step, eval loss)
  finals: dict[int, float]  # finished seed -> eval loss at the last step
  eval_se: float  # mean over seeds of the final held-out loss's standard error (the held-out set's noise)
  grid: dict[float, float]  # learning rate -> held-out loss of the selection seed (finished ones)
  heldout: dict[int, list[float]]  # seed -> final held-out loss per held-out batch (experiments.heldout)
  health: dict[str, float]  # router health at the last logged step, worst layer, mean over seeds
  tokens_per_s: float  # median over seeds and logged intervals (the first, which compiles, left out)
  peak_memory_gb: float
  wall_s: float  # mean over seeds
  balancing: str = ""  # an MoE run's balancing settings, from its trainings' config.json
  load_curves: dict[int, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)  # seed -> (step,
  # worst layer's max_load_ratio) at every logged step

  @property
  def mean(self) -> float:
    return statistics.fmean(self.finals.values()) if self.finals else float("nan")

  @property
  def sd(self) -> float:
    return statistics.stdev(self.finals.values()) if len(self.finals) > 1 else float("nan")


@dataclasses.dataclass(frozen=True)
class Comparison:
  run: str
  baseline: str
  n: int  # seeds both finished
  mean: float  # mean of run - baseline over those seeds (negative: the run is better)
  ci: tuple[float, float]  # 95% t-interval of the mean difference
  p: float  # paired t-test, two-sided
  seed_se: float = float("nan")  # standard error of the mean difference over seeds
  heldout_se: float = float("nan")  # the held-out set's own noise in it: standard error over held-out batches
  p_holm: float = float("nan")  # Holm-adjusted over the sweep's comparisons
  ci_holm: tuple[float, float] = (float("nan"), float("nan"))  # interval at the level Holm tests it at

  @property
  def distinguishable(self) -> bool:
    return self.p_holm <= ALPHA


def paired(run: Result, baseline: Result) -> Comparison | None:
  seeds = sorted(set(run.finals) & set(baseline.finals))
  if len(seeds) < 2:
    return None
  d = np.array([run.finals[s] - baseline.finals[s] for s in seeds])
  mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
  half = stats.t.ppf(1 - ALPHA / 2, len(d) - 1) * se
  p = float(stats.ttest_rel([run.finals[s] for s in seeds], [baseline.finals[s] for s in seeds]).pvalue)
  if se == 0:  # identical differences on every seed
    p = 0.0 if mean else 1.0
  heldout_se = float("nan")
  if all(s in run.heldout and s in baseline.heldout for s in seeds):
    per_batch = np.mean([np.subtract(run.heldout[s], baseline.heldout[s]) for s in seeds], axis=0)
    heldout_se = float(per_batch.std(ddof=1) / math.sqrt(len(per_batch)))
  return Comparison(run.name, baseline.name, len(d), mean, (mean - half, mean + half), p, se, heldout_se)


def holm(comparisons: list[Comparison]) -> list[Comparison]:
  """Holm's step-down correction: sorted by p, the i-th (from 0) is tested at ALPHA / (m - i), and
  rejected only if every smaller p was; adjusted p = running max of (m - i) p. Each comparison's
  corrected interval is its t-interval at the level it is tested at. Returned in the input order."""
  m = len(comparisons)
  order = sorted(range(m), key=lambda i: comparisons[i].p)
  out, running = list(comparisons), 0.0
  for rank, i in enumerate(order):
    c = comparisons[i]
    running = max(running, min(1.0, (m - rank) * c.p))
    half = stats.t.ppf(1 - ALPHA / (2 * (m - rank)), c.n - 1) * c.seed_se
    out[i] = dataclasses.replace(c, p_holm=running, ci_holm=(c.mean - half, c.mean + half))
  return out


def compare_all(results: list[Result]) -> list[Comparison]:
  by_name = {r.name: r for r in results}
  comparisons = [c for r in results if (base := by_name.get(r.spec["baseline"])) and (c := paired(r, base))]
  return holm(comparisons)


def _seed_folders(run_folder: Path) -> dict[int, Path]:
  return {int(p.name[4:]): p for p in run_folder.glob("seed*") if p.is_dir() and p.name[4:].isdigit()}


def _per_layer(row: dict, metric: str) -> list[float]:
  """One logged row's values of a per-layer router metric (`moe/max_load_ratio/layer03`, ...)."""
  return [v for k, v in row.items() if k.startswith(metric)]


def _health(rows: list[dict]) -> dict[str, float]:
  """The last logged step's router health, worst layer: largest max_load_ratio and dead share, lowest
  usage entropy."""
  last = next((r for r in reversed(rows) if _per_layer(r, "moe/max_load_ratio")), None)
  if last is None:
    return {}
  return {"max_load_ratio": max(_per_layer(last, "moe/max_load_ratio")),
          "usage_entropy": min(_per_layer(last, "moe/usage_entropy"), default=float("nan")),
          "dead_experts": max(_per_layer(last, "moe/dead_experts"), default=float("nan"))}


def _balancing(folder: Path) -> str:
  """The balancing loss weight, z-loss weight and aux-loss-free bias rate the run's trainings used."""
  for config in sorted(folder.glob("seed*/config.json")):
    m = json.loads(config.read_text())["model"]
    return (f"{m['moe_aux_loss_weight']:g}, {m['moe_z_loss_weight']:g}, "
            f"{m.get('moe_bias_update_rate', 0.0):g}")
  return ""


def selection_seeds(description: dict) -> list[int]:
  """The seeds learning rates were chosen on (one, `selection_seed`, in sweeps from before there were two)."""
  return description.get("selection_seeds") or [description.get("selection_seed", 1000)]


def load(sweep_dir: Path) -> tuple[dict, list[Result]]:
  description = json.loads((sweep_dir / "sweep.json").read_text())
  results = []
  for spec in description["runs"]:
    folder, steps = sweep_dir / spec["name"], spec["steps"]
    curves, finals, ses, healths, rates, peaks, walls, heldout, load_curves = {}, {}, [], [], [], [], [], {}, {}
    for seed, sub in sorted(_seed_folders(folder).items()):
      rows = metrics(sub)
      curve = sorted((r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r)
      if not curve:
        continue
      curves[seed] = curve
      loads = [(r["step"], max(v)) for r in rows if (v := _per_layer(r, "moe/max_load_ratio"))]
      if loads:
        load_curves[seed] = loads
      if curve[-1][0] >= steps:
        finals[seed] = final_test(sub, steps)
        split = "test" if any("test/loss" in r for r in rows) else "eval"  # eval: from before the test split
        ses += [r[f"{split}/loss_se"] for r in rows if r["step"] >= steps and f"{split}/loss_se" in r][-1:]
        healths.append(_health(rows))
        if (sub / "heldout.json").is_file():
          heldout[seed] = json.loads((sub / "heldout.json").read_text())["batch_losses"]
      perf = [r for r in rows if "perf/tokens_per_s" in r]
      rates += [r["perf/tokens_per_s"] for r in perf[1:]]
      peaks += [r.get("perf/peak_memory_gib", r.get("perf/peak_memory_gb")) for r in perf  # _gb: before 2026-12
                if "perf/peak_memory_gib" in r or "perf/peak_memory_gb" in r]
      walls += [max(r["perf/elapsed_s"] for r in perf)] if perf and "perf/elapsed_s" in perf[-1] else []
    chooser = selection_seeds(description)
    grid = {lr: statistics.fmean(v.values()) for lr, v in selection_losses(folder, steps, chooser).items()
            if len(v) == len(chooser)}
    health = {k: statistics.fmean(h[k] for h in healths) for k in healths[0]} if healths and healths[0] else {}
    if health:  # a mean hides single seeds: count those whose worst layer ends past half of collapse
      half = spec["n_experts"] / spec["top_k"] / 2
      health["collapsing_seeds"] = sum(h["max_load_ratio"] > half for h in healths)
    results.append(Result(spec["name"], spec, curves, finals, statistics.fmean(ses) if ses else float("nan"),
                          grid, heldout, health, statistics.median(rates) if rates else float("nan"),
                          max(peaks, default=float("nan")), statistics.fmean(walls) if walls else float("nan"),
                          _balancing(folder) if health else "", load_curves))
  return description, results


def _fmt_lr(lr: float) -> str:
  return f"{lr:.3g}"


def markdown(description: dict, results: list[Result], comparisons: list[Comparison]) -> str:
  first = description["runs"][0]
  tokens = first["steps"] * first["tokens_per_step"]
  lrs = description.get("lrs", [])
  lines = [f"# Sweep `{description['sweep']}`, scale `{description['scale']}`", "",
           f"{len(results)} runs. Each trains {first['steps']:,} steps of {first['tokens_per_step']:,} tokens "
           f"({tokens:,} tokens) at its own learning rate, chosen on the mean validation loss of seeds "
           f"{', '.join(map(str, selection_seeds(description)))} "
           f"from the grid {', '.join(map(_fmt_lr, lrs))} (widened where the best value was at an edge), "
           f"then {description['seeds']} compared seeds (0..{description['seeds'] - 1}) at that value"
           + (f"; overrides: {' '.join(f'{k}={v}' for k, v in description['overrides'].items())}"
              if description["overrides"] else "") + ".",
           "Final eval loss: held-out cross-entropy (nats/token) at the last step, mean ± standard deviation "
           "over seeds [min, max]. tokens/active, tokens/total: training tokens per active and per total "
           "parameter.", "",
           "| run | changes | lr | final eval loss | [min, max] | params | active | tokens/active | tokens/total | "
           "train FLOPs/token | tokens/s | peak memory GiB | wall s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    choice = choose_lr(r.grid) if r.grid else None
    finals = (f"{r.mean:.4f} ± {r.sd:.4f}" if len(r.finals) > 1 else f"{r.mean:.4f}") if r.finals else \
        f"unfinished ({len(r.curves)} seeds started)"
    lines.append(
        f"| {r.name} | {', '.join(r.spec['changes']) or '-'} | {_fmt_lr(choice.lr) if choice else '-'} | {finals} | "
        + (f"[{min(r.finals.values()):.4f}, {max(r.finals.values()):.4f}]" if r.finals else "-")
        + f" | {r.spec['total_params']:,} | {r.spec['active_params']:,} | {tokens / r.spec['active_params']:.1f} | "
        f"{tokens / r.spec['total_params']:.1f} | {r.spec['flops_per_token']:,.0f} | {r.tokens_per_s:,.0f} | "
        f"{r.peak_memory_gb:.2f} | {r.wall_s:.0f} |")

  m = len(comparisons)
  lines += ["", "## Comparisons, seed by seed", "",
            f"Each run against the baseline fixed before the runs (`vs`), over the seeds both finished (n): "
            f"Δ = mean over seeds of (run - vs), negative is better; its 95% t-interval; p of a paired t-test; "
            f"Holm's correction over the {m} comparisons of this sweep (adjusted p, and the interval at the "
            f"level Holm tests it at). **Distinguishable** only where Holm rejects at {ALPHA:g}.", "",
            "| run | vs | n | Δ | 95% CI | p | Holm p | corrected CI | verdict |",
            "|---|---|---|---|---|---|---|---|---|"]
  for c in comparisons:
    verdict = f"**distinguishable: {'better' if c.mean < 0 else 'worse'}**" if c.distinguishable else \
        "not distinguishable"
    lines.append(f"| {c.run} | {c.baseline} | {c.n} | {c.mean:+.4f} | [{c.ci[0]:+.4f}, {c.ci[1]:+.4f}] | "
                 f"{c.p:.3g} | {c.p_holm:.3g} | [{c.ci_holm[0]:+.4f}, {c.ci_holm[1]:+.4f}] | {verdict} |")
  real = [c for c in comparisons if c.distinguishable]
  lines += ["", "Distinguishable at this scale: " + ("; ".join(
      f"`{c.run}` vs `{c.baseline}` {c.mean:+.4f} [{c.ci_holm[0]:+.4f}, {c.ci_holm[1]:+.4f}]" for c in real)
      if real else "none") + ".",
            "Not distinguishable at this scale: " + (", ".join(
                f"`{c.run}` vs `{c.baseline}`" for c in comparisons if not c.distinguishable) or "none") + "."]

  lines += ["", "## Learning rates", "",
            "Held-out loss of the selection seed at every value tried; the lowest is used for the compared seeds.",
            "", "| run | chosen | " + " | ".join(["held-out loss at each learning rate"]) + " | flag |", "|---|---|---|---|"]
  for r in results:
    if not r.grid:
      continue
    choice = choose_lr(r.grid)
    cells = ", ".join(f"{_fmt_lr(lr)}: {loss:.4f}" for lr, loss in choice.losses.items())
    lines.append(f"| {r.name} | {_fmt_lr(choice.lr)} | {cells} | "
                 + ("**best at the edge of the grid: widen it**" if choice.at_edge else "") + " |")

  moe = [r for r in results if r.health]
  if moe:
    lines += ["", "## Router health", "",
              "At the last logged step, the worst layer, mean over seeds: max_load_ratio (experts x the busiest "
              "expert's share of the assignments: 1 is balanced, E / top_k is collapse), usage entropy (entropy of "
              "the shares / log E: 1 is balanced) and the share of experts that got no assignment; and how many "
              "seeds end with a layer past half the collapse value (a partly collapsed router: that seed's "
              "result measures a partly broken MoE). Balancing: the load-balancing loss weight, the router z-loss "
              "weight and the aux-loss-free selection bias's update rate (0: off).", "",
              "| run | experts, top-k | balancing | max_load_ratio | collapse value | usage entropy | dead experts "
              "| seeds past half of collapse |",
              "|---|---|---|---|---|---|---|---|"]
    for r in moe:
      E, k = r.spec["n_experts"], r.spec["top_k"]
      lines.append(f"| {r.name} | {E}, {k} | {r.balancing} | {r.health['max_load_ratio']:.2f} | {E / k:.1f} | "
                   f"{r.health['usage_entropy']:.3f} | {r.health['dead_experts']:.3f} | "
                   + (f"**{r.health['collapsing_seeds']} of {len(r.finals)}**" if r.health["collapsing_seeds"] else "0")
                   + " |")

  lines += ["", "## Noise", "",
            "Seed-to-seed standard deviation of the final held-out loss against the held-out set's own noise "
            "(standard error of its mean over held-out batches, mean over seeds); the comparisons above pair seeds "
            "on the same held-out set.", "", "| run | seed sd | held-out standard error | ratio |", "|---|---|---|---|"]
  for r in results:
    if len(r.finals) > 1:
      lines.append(f"| {r.name} | {r.sd:.4f} | {r.eval_se:.4f} | {r.sd / r.eval_se:.1f} |")
  if any(math.isfinite(c.heldout_se) for c in comparisons):
    lines += ["", "Each comparison's own noise: the standard error of Δ over seeds (what the interval above is made "
              "of) against the part of it that is the held-out set's (the standard error, over held-out batches, of "
              "the per-batch difference between the two runs, seeds averaged; from `python -m experiments.heldout`). "
              "The held-out set is large enough when the second is small against the first.", "",
              "| run | vs | seed standard error of Δ | held-out standard error of Δ | ratio |", "|---|---|---|---|---|"]
    for c in comparisons:
      if math.isfinite(c.heldout_se):
        lines.append(f"| {c.run} | {c.baseline} | {c.seed_se:.4f} | {c.heldout_se:.4f} | {c.seed_se / c.heldout_se:.1f} |")
  lines += ["", "![eval loss against steps](loss_vs_steps.png)", "![eval loss against training FLOPs]"
            "(loss_vs_flops.png)", "![final eval loss per run](final_loss.png)",
            "![paired differences](differences.png)", "![learning-rate grid](lr_grid.png)"]
  if moe:
    lines.append("![router load over training](router_health.png)")
  lines.append("")
  return "\n".join(lines)


def plot(description: dict, results: list[Result], comparisons: list[Comparison], out: Path) -> list[Path]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  title = f"{description['sweep']} ({description['scale']})"
  colors = plt.get_cmap("tab20")(np.arange(len(results)) % 20)
  paths = []
  for name, x_label, log_x in (("loss_vs_steps", "step", False), ("loss_vs_flops", "training FLOPs", True)):
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for r, color in zip(results, colors):
      steps = sorted({s for curve in r.curves.values() for s, _ in curve})
      if not steps:
        continue
      per_step = [[dict(c)[s] for c in r.curves.values() if s in dict(c)] for s in steps]
      x = np.array(steps, float) * (r.spec["tokens_per_step"] * r.spec["flops_per_token"] if log_x else 1)
      ax.plot(x, [np.mean(v) for v in per_step], label=r.name, linewidth=1.2, color=color)
      ax.fill_between(x, [min(v) for v in per_step], [max(v) for v in per_step], color=color, alpha=0.15)
    if log_x:
      ax.set_xscale("log")
    ax.set(xlabel=x_label, ylabel="eval loss (nats/token)", title=f"{title}: mean over seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _set_tail_ylim(ax, results)
    paths.append(_save(fig, out / f"{name}.png"))

  done = [r for r in results if r.finals]
  fig, ax = plt.subplots(figsize=(8, 0.4 * len(done) + 1.5), dpi=100)
  y = np.arange(len(done))[::-1]
  means = np.array([r.mean for r in done])
  ax.errorbar(means, y, xerr=[means - [min(r.finals.values()) for r in done],
                              [max(r.finals.values()) for r in done] - means], fmt="o", capsize=3)
  for yi, r in zip(y, done):
    ax.scatter(list(r.finals.values()), [yi] * len(r.finals), s=8, color="gray", zorder=3)
  ax.set_yticks(y, [r.name for r in done])
  ax.set(xlabel="final eval loss (nats/token): mean, min..max, seeds in gray", title=title)
  ax.grid(alpha=0.3, axis="x")
  paths.append(_save(fig, out / "final_loss.png"))

  fig, ax = plt.subplots(figsize=(8, 0.4 * len(comparisons) + 1.5), dpi=100)
  y = np.arange(len(comparisons))[::-1]
  for yi, c in zip(y, comparisons):
    color = "tab:blue" if c.distinguishable and c.mean < 0 else "tab:red" if c.distinguishable else "gray"
    ax.plot(c.ci_holm, [yi, yi], color=color, linewidth=1, alpha=0.5)
    ax.plot(c.ci, [yi, yi], color=color, linewidth=3)
    ax.plot([c.mean], [yi], "o", color=color)
  ax.axvline(0, color="black", linewidth=0.8)
  ax.set_yticks(y, [f"{c.run} vs {c.baseline}" for c in comparisons])
  ax.set(xlabel="paired difference in final eval loss (run - vs): thick 95% CI, thin Holm-corrected CI",
         title=f"{title}\nblue better, red worse (distinguishable after Holm), gray not distinguishable")
  ax.grid(alpha=0.3, axis="x")
  paths.append(_save(fig, out / "differences.png"))

  fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
  for r, color in zip(results, colors):
    if r.grid:
      lrs = sorted(r.grid)
      ax.plot(lrs, [r.grid[lr] for lr in lrs], "o-", label=r.name, color=color, markersize=3)
      ax.plot([choose_lr(r.grid).lr], [min(r.grid.values())], "*", color=color, markersize=10)
  ax.set_xscale("log")
  ax.set(xlabel="peak learning rate", ylabel="final eval loss, selection seed", title=f"{title}: chosen value starred")
  ax.grid(alpha=0.3)
  if any(r.grid for r in results):
    ax.legend(fontsize=7, ncol=2)
  paths.append(_save(fig, out / "lr_grid.png"))

  moe = [(r, color) for r, color in zip(results, colors) if r.load_curves]
  if moe:
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for r, color in moe:
      collapse = r.spec["n_experts"] / r.spec["top_k"]
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
    paths.append(_save(fig, out / "router_health.png"))
  return paths


def _save(fig, path: Path) -> Path:
  fig.tight_layout()
  fig.savefig(path)
  import matplotlib.pyplot as plt
  plt.close(fig)
  return path


def _set_tail_ylim(ax, results: list[Result]) -> None:
  """Zoom on the part of training where runs differ: from the best final loss to the loss all runs
  had reached a quarter of the way in."""
  finals = [v for r in results for v in r.finals.values()]
  quarter = [c[len(c) // 4][1] for r in results for c in r.curves.values() if c]
  if finals and quarter:
    lo, hi = min(finals), max(quarter)
    ax.set_ylim(lo - 0.05 * (hi - lo), hi)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
  parser.add_argument("sweep_dir", help="the folder experiments.run wrote (holds sweep.json)")
  parser.add_argument("--out", default="", help="where report.md and the plots go (default: the sweep folder)")
  parser.add_argument("--tensorboard", action="store_true",
                      help="also write OUT/tb: every training's scalars, HParams and a layout, from metrics.jsonl")
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
  comparisons = compare_all(results)
  (out / "report.md").write_text(markdown(description, results, comparisons))
  print(f"wrote {out / 'report.md'} and " + ", ".join(p.name for p in plot(description, results, comparisons, out)))
  if args.tensorboard:
    from experiments import tensorboard
    print(f"wrote {tensorboard.write(sweep_dir, description, out / 'tb')}: tensorboard --logdir {out / 'tb'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
