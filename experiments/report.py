"""python -m experiments.report <sweep folder> [--out DIR] [--no-baselines] [--tensorboard]
   python -m experiments.report --readme README.md docs/results.md

Reads the sweep's sweep.json and every training's metrics.jsonl; writes report.md and PNG plots:
- each run's learning rate (every grid value's validation loss on each selection seed; a best value at the
  grid's edge flagged);
- its final test loss over the compared seeds, budgets (tokens per active and per total parameter,
  training FLOPs per token), speed and memory; router health for mixtures of experts, at the end and over
  the whole run;
- count-based n-gram baselines (experiments.ngram) on the same test windows, beside the runs;
- every comparison fixed before the runs (a run against its baseline), seed by seed (experiments.paired):
  the mean paired difference, its 95% t-interval, the paired t-test's and the exact sign-flip test's p,
  both Holm-corrected over the sweep's comparisons, and the family's simultaneous interval. A difference is
  called distinguishable only where both corrected tests reject; everything else is "not distinguishable";
  and the same comparisons at every learning rate both runs tried, flagged where the sign changes;
- the test set's own noise (standard error over its batches) beside the seed-to-seed spread.
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

from experiments import context, harness, mxfp4_cost, ngram, plots, verdicts
from experiments.description import RunSpec, SweepDescription
from experiments.paired import ALPHA, Comparison, compare, corrected, seeds_needed, sign_flip_floor
from experiments.folders import choose_lr, final_test, metrics, selection_losses
from gptoss_jax.config import ConfigError


@dataclasses.dataclass
class Result:
  name: str
  spec: RunSpec  # the run's entry in sweep.json
  curves: dict[int, list[tuple[int, float]]]  # seed -> (step, eval loss)
  finals: dict[int, float]  # finished seed -> eval loss at the last step
  eval_se: float  # mean over seeds of the final held-out loss's standard error (the held-out set's noise)
  grid: dict[float, float]  # learning rate -> held-out loss of the selection seed (finished ones)
  heldout: dict[int, list[float]]  # seed -> final held-out loss per held-out batch (experiments.heldout)
  health: dict[str, float]  # router health at the last logged step, worst layer, mean over seeds
  tokens_per_s: float  # median over seeds and logged intervals (the first, which compiles, left out)
  peak_memory_gib: float
  wall_s: float  # mean over seeds
  balancing: str = ""  # an MoE run's balancing settings, from its trainings' config.json
  load_curves: dict[int, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)  # seed -> (step,
  # worst layer's max_load_ratio) at every logged step
  selection: dict[float, dict[int, float]] = dataclasses.field(default_factory=dict)  # lr -> selection seed ->
  # validation loss
  warmup: int = 0  # the trainings' warm-up steps
  seed_health: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)  # finished seed -> its health
  dead_curves: dict[int, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)  # seed -> (step, the
  # largest share of a layer's experts that got no assignment) at every logged step

  @property
  def mean(self) -> float:
    return statistics.fmean(self.finals.values()) if self.finals else float("nan")

  @property
  def sd(self) -> float:
    return statistics.stdev(self.finals.values()) if len(self.finals) > 1 else float("nan")

  def router_over_run(self) -> dict[str, float]:
    """Router health over the whole run of the compared seeds, not just its end: the share of logged steps
    whose worst layer is past half of collapse (mean over seeds, and the worst seed's), and the largest
    worst-layer load after warm-up as a fraction of collapse (over seeds)."""
    if not self.load_curves:
      return {}
    collapse = self.spec.collapse
    shares = [np.mean([v > collapse / 2 for _, v in c]) for c in self.load_curves.values()]
    after = [v for c in self.load_curves.values() for s, v in c if s > self.warmup]
    return {"past_half_share": float(np.mean(shares)), "past_half_share_worst_seed": float(max(shares)),
            "largest_after_warmup": max(after, default=float("nan")) / collapse}


def paired(run: Result, baseline: Result) -> Comparison | None:
  seeds = sorted(set(run.finals) & set(baseline.finals))
  if len(seeds) < 2:
    return None
  d = np.array([run.finals[s] - baseline.finals[s] for s in seeds])
  heldout_se = float("nan")
  if all(s in run.heldout and s in baseline.heldout for s in seeds):
    per_batch = np.mean([np.subtract(run.heldout[s], baseline.heldout[s]) for s in seeds], axis=0)
    heldout_se = float(per_batch.std(ddof=1) / math.sqrt(len(per_batch)))
  return compare(run.name, baseline.name, d, heldout_se)


def compare_all(results: list[Result]) -> list[Comparison]:
  by_name = {r.name: r for r in results}
  comparisons = [c for r in results if (base := by_name.get(r.spec.baseline)) and (c := paired(r, base))]
  return corrected(comparisons)


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


def _warmup(folder: Path) -> int:
  for config in sorted(folder.glob("seed*/config.json")):
    return json.loads(config.read_text()).get("train", {}).get("warmup_steps", 0)
  return 0


def _balancing(folder: Path) -> str:
  """The balancing loss weight, z-loss weight and aux-loss-free bias rate the run's trainings used."""
  for config in sorted(folder.glob("seed*/config.json")):
    m = json.loads(config.read_text())["model"]
    return (f"{m['moe_aux_loss_weight']:g}, {m['moe_z_loss_weight']:g}, "
            f"{m.get('moe_bias_update_rate', 0.0):g}")
  return ""


def load(sweep_dir: Path) -> tuple[SweepDescription, list[Result]]:
  description = SweepDescription.load(sweep_dir / "sweep.json")
  results = []
  for spec in description.runs:
    folder, steps = sweep_dir / spec.name, spec.steps
    curves, finals, ses, healths, rates, peaks, walls, heldout, load_curves = {}, {}, [], [], [], [], [], {}, {}
    seed_health, dead_curves = {}, {}
    for seed, sub in sorted(_seed_folders(folder).items()):
      rows = metrics(sub)
      curve = sorted((r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r)
      if not curve:
        continue
      curves[seed] = curve
      loads = [(r["step"], max(v)) for r in rows if (v := _per_layer(r, "moe/max_load_ratio"))]
      if loads:
        load_curves[seed] = loads
        dead_curves[seed] = [(r["step"], max(_per_layer(r, "moe/dead_experts"), default=0.0)) for r in rows
                             if _per_layer(r, "moe/max_load_ratio")]
      if curve[-1][0] >= steps:
        finals[seed] = final_test(sub, steps)
        split = "test" if any("test/loss" in r for r in rows) else "eval"  # eval: from before the test split
        ses += [r[f"{split}/loss_se"] for r in rows if r["step"] >= steps and f"{split}/loss_se" in r][-1:]
        healths.append(_health(rows))
        if healths[-1]:
          seed_health[seed] = healths[-1]
        if (sub / "heldout.json").is_file():
          heldout[seed] = json.loads((sub / "heldout.json").read_text())["batch_losses"]
      perf = [r for r in rows if "perf/tokens_per_s" in r]
      rates += [r["perf/tokens_per_s"] for r in perf[1:]]
      peaks += [r.get("perf/peak_memory_gib", r.get("perf/peak_memory_gb")) for r in perf  # _gb: before 2026-12
                if "perf/peak_memory_gib" in r or "perf/peak_memory_gb" in r]
      walls += [max(r["perf/elapsed_s"] for r in perf)] if perf and "perf/elapsed_s" in perf[-1] else []
    chooser = list(description.selection_seeds)
    selection = selection_losses(folder, steps, chooser)
    grid = {lr: statistics.fmean(v.values()) for lr, v in selection.items() if len(v) == len(chooser)}
    health = {k: statistics.fmean(h[k] for h in healths) for k in healths[0]} if healths and healths[0] else {}
    if health:  # a mean hides single seeds: count those whose worst layer ends past half of collapse
      half = spec.collapse / 2
      health["collapsing_seeds"] = sum(h["max_load_ratio"] > half for h in healths)
    results.append(Result(spec.name, spec, curves, finals, statistics.fmean(ses) if ses else float("nan"),
                          grid, heldout, health, statistics.median(rates) if rates else float("nan"),
                          max(peaks, default=float("nan")), statistics.fmean(walls) if walls else float("nan"),
                          _balancing(folder) if health else "", load_curves, selection, _warmup(folder), seed_health,
                          dead_curves))
  return description, results


def _fmt_lr(lr: float) -> str:
  return f"{lr:.3g}"


def markdown(description: SweepDescription, results: list[Result], comparisons: list[Comparison],
             baselines: dict | None = None) -> str:
  sections = [_runs_section(description, results, baselines), _baselines_section(results, baselines),
              _comparisons_section(comparisons), _sensitivity_section(results, comparisons),
              _lr_section(results), _router_section(results), _noise_section(results, comparisons), _images(results)]
  return "\n".join(line for section in sections for line in section) + "\n"


def _reported(description: SweepDescription) -> str:
  return "test" if len(description.selection_seeds) > 1 else "held-out"  # held-out: before the three splits


def _runs_section(description: SweepDescription, results: list[Result], baselines: dict | None) -> list[str]:
  first = description.runs[0]
  tokens = first.steps * first.tokens_per_step
  split = _reported(description)
  lines = [f"# Sweep `{description.sweep}`, scale `{description.scale}`", "",
           f"{len(results)} runs. Each trains {first.steps:,} steps of {first.tokens_per_step:,} tokens "
           f"({tokens:,} tokens) at its own learning rate, chosen on the mean validation loss of seeds "
           f"{', '.join(map(str, description.selection_seeds))} from the grid "
           f"{', '.join(map(_fmt_lr, description.lrs))} (widened where the best value was at an edge), "
           f"then {description.seeds} compared seeds (0..{description.seeds - 1}) at that value"
           + (f"; overrides: {' '.join(f'{k}={v}' for k, v in description.overrides.items())}"
              if description.overrides else "") + ".",
           f"Final {split} loss: cross-entropy (nats/token) on the {split} split at the last step, mean ± standard "
           "deviation over seeds [min, max]. tokens/active, tokens/total: training tokens per active and per total "
           "parameter." + (" vs n-gram: the mean's difference from the best n-gram baseline counted on as many "
                           "training tokens as one training sees (negative: the network is better)." if baselines else ""),
           "", f"| run | changes | lr | final {split} loss | [min, max] | params | active | tokens/active | "
           "tokens/total | train FLOPs/token | tokens/s | peak memory GiB | wall s |" + (" vs n-gram |" if baselines else ""),
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if baselines else "")]
  best = min(baselines["seen"].values()) if baselines else None
  for r in results:
    choice = choose_lr(r.grid) if r.grid else None
    finals = (f"{r.mean:.4f} ± {r.sd:.4f}" if len(r.finals) > 1 else f"{r.mean:.4f}") if r.finals else \
        f"unfinished ({len(r.curves)} seeds started)"
    lines.append(
        f"| {r.name} | {', '.join(r.spec.changes) or '-'} | {_fmt_lr(choice.lr) if choice else '-'} | {finals} | "
        + (f"[{min(r.finals.values()):.4f}, {max(r.finals.values()):.4f}]" if r.finals else "-")
        + f" | {r.spec.total_params:,} | {r.spec.active_params:,} | {tokens / r.spec.active_params:.1f} | "
        f"{tokens / r.spec.total_params:.1f} | {r.spec.flops_per_token:,.0f} | {r.tokens_per_s:,.0f} | "
        f"{r.peak_memory_gib:.2f} | {r.wall_s:.0f} |" + (f" {r.mean - best:+.4f} |" if baselines else ""))
  return lines


def _baselines_section(results: list[Result], baselines: dict | None) -> list[str]:
  if not baselines:
    return []
  seen, whole = baselines["seen"], baselines["whole"]
  best_seen, best_whole = min(seen, key=seen.get), min(whole, key=whole.get)
  beat = [r.name for r in results if r.finals and r.mean < seen[best_seen]]
  return ["", "## Count-based baselines", "",
          f"Interpolated Kneser-Ney n-gram models (`experiments/ngram.py`) scored on the same {baselines['split']} "
          f"windows as the runs, counted on the {baselines['seen_tokens']:,} training tokens one training sees (seed "
          f"{baselines['seed']}'s draw) and on the whole training split ({baselines['whole_tokens']:,} tokens).", "",
          "| order | " + " | ".join(map(str, seen)) + " |", "|---|" + "---|" * len(seen),
          "| as one training sees | " + " | ".join(f"{v:.4f}" for v in seen.values()) + " |",
          "| whole training split | " + " | ".join(f"{v:.4f}" for v in whole.values()) + " |", "",
          f"Best: order {best_seen} at {seen[best_seen]:.4f} on a training's tokens, order {best_whole} at "
          f"{whole[best_whole]:.4f} on the whole split. Runs whose mean beats the first: "
          + (", ".join(f"`{n}`" for n in beat) if beat else "none") + "; the second: "
          + (", ".join(f"`{r.name}`" for r in results if r.finals and r.mean < whole[best_whole]) or "none") + "."]


def _comparisons_section(comparisons: list[Comparison]) -> list[str]:
  m = len(comparisons)
  lines = ["", "## Comparisons, seed by seed", "",
           f"Each run against the baseline fixed before the runs (`vs`), over the seeds both finished (n): Δ = mean over "
           f"seeds of (run - vs), negative is better; its 95% t-interval; two-sided p of the paired t-test and of the "
           f"exact sign-flip test (all 2^n sign patterns; no normality assumed; at least 2 / 2^n); both Holm-adjusted "
           f"over the {m} comparisons of this sweep; and the simultaneous interval of the family (each at level "
           f"1 - {ALPHA:g} / {m}, Bonferroni). **Distinguishable** only where Holm rejects at {ALPHA:g} for both tests (Holm's step-down is "
           f"more powerful than the simultaneous intervals, so a verdict can stand where the interval touches zero).", "",
           "| run | vs | n | Δ | 95% CI | p (t) | p (sign-flip) | Holm p (t) | Holm p (sign-flip) | simultaneous CI | "
           "verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  lines += [f"| {c.run} | {c.baseline} | {c.cells()}" for c in comparisons]
  real = [c for c in comparisons if c.distinguishable]
  n = min((c.n for c in comparisons), default=0)
  if comparisons and sign_flip_floor(n, m) > ALPHA:
    t_only = [c for c in comparisons if c.p_holm <= ALPHA]
    lines += ["", f"**With {n} seeds no comparison of this sweep can pass the rule**: the sign-flip test's smallest p is "
              f"2 / 2^{n} = {2 / 2**n:.4f} (every seed one way) and Holm's first step multiplies it by {m}: "
              f"{sign_flip_floor(n, m):.3f} > {ALPHA:g}. {seeds_needed(m)} seeds are the fewest that can. For orientation, "
              f"not as verdicts: Holm on the t-test alone rejects for " + (", ".join(
                  f"`{c.run}` vs `{c.baseline}` ({c.mean:+.4f}, sign-flip p {c.p_sign:.3g})" for c in t_only) or "none") + "."]
  return lines + ["", "Distinguishable at this scale: " + ("; ".join(
      f"`{c.run}` vs `{c.baseline}` {c.mean:+.4f} [{c.ci_simultaneous[0]:+.4f}, {c.ci_simultaneous[1]:+.4f}]"
      for c in real) if real else "none") + ".", "Not distinguishable at this scale: " + (", ".join(
          f"`{c.run}` vs `{c.baseline}`" for c in comparisons if not c.distinguishable) or "none") + "."]


def lr_differences(run: Result, baseline: Result) -> dict[float, float]:
  """At every learning rate both runs tried on every selection seed: the mean over those seeds of the
  difference in validation loss (run - baseline)."""
  shared = {}
  for lr in sorted(set(run.selection) & set(baseline.selection)):
    seeds = sorted(set(run.selection[lr]) & set(baseline.selection[lr]))
    if seeds:
      shared[lr] = statistics.fmean(run.selection[lr][s] - baseline.selection[lr][s] for s in seeds)
  return shared


def _sensitivity_section(results: list[Result], comparisons: list[Comparison]) -> list[str]:
  by_name = {r.name: r for r in results}
  rows = [(c, d) for c in comparisons if len(d := lr_differences(by_name[c.run], by_name[c.baseline])) > 1]
  if not rows:
    return []
  lines = ["", "## Comparisons at each shared learning rate", "",
           "The same comparisons on the selection seeds' validation loss, at every learning rate both runs tried (the "
           "table above compares each at its own chosen rate). **Learning-rate sensitive**: the sign changes across "
           "the shared rates, so which is better depends on the rate.", "",
           "| run | vs | Δ at each shared learning rate | flag |", "|---|---|---|---|"]
  for c, d in rows:
    flip = min(d.values()) < 0 < max(d.values())
    lines.append(f"| {c.run} | {c.baseline} | " + ", ".join(f"{_fmt_lr(lr)}: {v:+.4f}" for lr, v in d.items())
                 + f" | {'**learning-rate sensitive**' if flip else ''} |")
  return lines


def _lr_section(results: list[Result]) -> list[str]:
  lines = ["", "## Learning rates", "",
           "Validation loss at every value tried, mean over the selection seeds (each seed's in brackets); the "
           "lowest mean is used for the compared seeds.", "",
           "| run | chosen | validation loss at each learning rate | flag |", "|---|---|---|---|"]
  for r in results:
    if not r.grid:
      continue
    choice = choose_lr(r.grid)
    cells = ", ".join(f"{_fmt_lr(lr)}: {loss:.4f}" + (
        f" ({' / '.join(f'{v:.4f}' for _, v in sorted(r.selection[lr].items()))})" if len(r.selection.get(lr, {})) > 1
        else "") for lr, loss in choice.losses.items())
    lines.append(f"| {r.name} | {_fmt_lr(choice.lr)} | {cells} | "
                 + ("**best at the edge of the grid: widen it**" if choice.at_edge else "") + " |")
  return lines


def _router_section(results: list[Result]) -> list[str]:
  moe = [r for r in results if r.health]
  if not moe:
    return []
  lines = ["", "## Router health", "",
           "At the last logged step, the worst layer, mean over seeds: max_load_ratio (experts x the busiest expert's "
           "share of the assignments: 1 is balanced, E / top_k is collapse), usage entropy (entropy of the shares / "
           "log E: 1 is balanced), the share of experts that got no assignment, and how many seeds end with a layer "
           "past half the collapse value. Over the whole run: the share of logged steps whose worst layer is past "
           "half of collapse (mean over seeds; the worst seed's), and the largest worst-layer load after warm-up as a "
           "fraction of collapse. Balancing: the load-balancing loss weight, the router z-loss weight and the "
           "aux-loss-free selection bias's update rate (0: off).", "",
           "| run | experts, top-k | balancing | max_load_ratio | collapse value | usage entropy | dead experts "
           "| seeds past half of collapse at the end | steps past half (mean; worst seed) | largest after warm-up |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in moe:
    E, k = r.spec.n_experts, r.spec.top_k
    over = r.router_over_run()
    lines.append(f"| {r.name} | {E}, {k} | {r.balancing} | {r.health['max_load_ratio']:.2f} | {E / k:.1f} | "
                 f"{r.health['usage_entropy']:.3f} | {r.health['dead_experts']:.3f} | "
                 + (f"**{r.health['collapsing_seeds']} of {len(r.finals)}**" if r.health["collapsing_seeds"] else "0")
                 + f" | {over['past_half_share']:.0%}; {over['past_half_share_worst_seed']:.0%} | "
                 f"{over['largest_after_warmup']:.2f} |")
  return lines


def _noise_section(results: list[Result], comparisons: list[Comparison]) -> list[str]:
  lines = ["", "## Noise", "",
           "Seed-to-seed standard deviation of the final loss against the evaluation set's own noise (standard error "
           "of its mean over batches, mean over seeds); the comparisons above pair seeds on the same windows.", "",
           "| run | seed sd | evaluation standard error | ratio |", "|---|---|---|---|"]
  lines += [f"| {r.name} | {r.sd:.4f} | {r.eval_se:.4f} | {r.sd / r.eval_se:.1f} |" for r in results if len(r.finals) > 1]
  if any(math.isfinite(c.heldout_se) for c in comparisons):
    lines += ["", "Each comparison's own noise: the standard error of Δ over seeds (what the intervals above are made of) "
              "against the part of it that is the evaluation set's (the standard error, over its batches, of the "
              "per-batch difference between the two runs, seeds averaged; from each training's `heldout.json`). The "
              "set is large enough when the second is small against the first.", "",
              "| run | vs | seed standard error of Δ | held-out standard error of Δ | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {c.run} | {c.baseline} | {c.seed_se:.4f} | {c.heldout_se:.4f} | {c.seed_se / c.heldout_se:.1f} |"
              for c in comparisons if math.isfinite(c.heldout_se)]
  return lines


def _images(results: list[Result]) -> list[str]:
  lines = ["", "![eval loss against steps](loss_vs_steps.png)", "![eval loss against training FLOPs](loss_vs_flops.png)",
           "![final loss per run](final_loss.png)", "![paired differences](differences.png)",
           "![learning-rate grid](lr_grid.png)"]
  return lines + (["![router load over training](router_health.png)"] if any(r.load_curves for r in results) else [])


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
  parser.add_argument("sweep_dir", nargs="?", default="", help="the folder experiments.run wrote (holds sweep.json)")
  parser.add_argument("--readme", nargs="+", default=[], metavar="FILE.md",
                      help="instead: rewrite these markdown files' result tables from the reports they name "
                           "(experiments/readme.py)")
  parser.add_argument("--out", default="", help="where report.md and the plots go (default: the sweep folder)")
  parser.add_argument("--no-baselines", action="store_true",
                      help="leave out the n-gram baselines (otherwise computed once into <sweep>/ngram.json)")
  parser.add_argument("--harness-tasks", default="", help="small and gpu scales: score each compared training's "
                      "final checkpoint on these lm-evaluation-harness tasks (experiments.harness; what is missing) and "
                      "compare them, a Holm family of their own")
  parser.add_argument("--harness-limit", type=float, default=None, help="at most this many documents per task")
  parser.add_argument("--tensorboard", action="store_true",
                      help="also write OUT/tb: every training's scalars, HParams and a layout, from metrics.jsonl")
  args = parser.parse_args(argv)
  if args.readme:
    from experiments import readme
    for path in args.readme:
      print(f"{readme.rewrite(Path(path))} table(s) of {path} rewritten from their reports")
    return 0
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
  baselines = None
  if not args.no_baselines:
    try:
      baselines = ngram.sweep_baselines(sweep_dir)
    except ConfigError as e:  # the dataset cannot be had here (no network, say): the report goes on without
      print(f"note: no n-gram baselines ({e})", file=sys.stderr)
  tasks = [t for t in args.harness_tasks.split(",") if t]
  try:
    benchmarks = harness.scored(sweep_dir, description, tasks, args.harness_limit)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  # sweeps evaluated past training (`context`), MoE trainings quantized after it (`experiments.mxfp4_cost`), scored
  # on benchmark tasks (`experiments.harness`)
  extra = (context.section(sweep_dir, description) + mxfp4_cost.section(sweep_dir, description)
           + harness.section(description, tasks, benchmarks))
  extra += verdicts.section(description, results, comparisons, lr_differences, baselines, sweep_dir,
                            context.past_length(sweep_dir, description), benchmarks)
  (out / "report.md").write_text(markdown(description, results, comparisons, baselines) + "\n".join(extra)
                                 + ("\n" if extra else ""))
  paths = plots.plot(description, results, comparisons, out, baselines) + context.plot(sweep_dir, description, out)
  print(f"wrote {out / 'report.md'} and " + ", ".join(p.name for p in paths))
  if args.tensorboard:
    from experiments import tensorboard
    print(f"wrote {tensorboard.write(sweep_dir, description, out / 'tb')}: tensorboard --logdir {out / 'tb'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
