"""The report's verdict sentences, written from its own numbers with the caveats they carry: which
comparisons are distinguishable (both Holm-corrected tests) and which are not, each flagged where the sign
changes across the learning rates both runs tried, where a chosen rate sits at the grid's edge, where a run
is near a count-based bigram or shares its trainings with another sweep; the gap to the n-gram baselines;
each mixture of experts' router health over the whole run, single trainings and transient collapse
included. The README's at-a-glance bullets are these lines, copied by `experiments/readme.py` and checked
by the test suite, so that no summary can say more than its report."""

from __future__ import annotations

import json
from pathlib import Path

from experiments.description import SweepDescription
from experiments.folders import choose_lr, final_test
from experiments.paired import ALPHA, Comparison, sign_flip_floor
from gptoss_jax.config import ConfigError, RunConfig

HEADING = "## Verdicts"
NEAR_BIGRAM = 0.1  # nats: a run whose final loss is within this of a bigram's (or above it) learned little more
COLLAPSE_TOLERANCE = 1e-3  # a logged max_load_ratio this close to the collapse value counts as collapse
SAME_TRAINING = ("model", "data", "train")  # a training elsewhere with these sections equal is the same one


def section(description: SweepDescription, results, comparisons: list[Comparison], lr_differences,
            baselines: dict | None, sweep_dir: Path, past_length=None, benchmarks=()) -> list[str]:
  """The report's `## Verdicts`: one bullet per kind of statement. `lr_differences(run, baseline)` gives the
  shared-rate differences; `past_length`: the context sweep's (between, yarn) comparisons, if any;
  `benchmarks`: experiments.harness.comparisons, if any."""
  by_name = {r.name: r for r in results}
  shared = shared_trainings(sweep_dir, description, by_name)
  near = _near_bigram(results, baselines)

  def caveats(c: Comparison) -> str:
    notes = []
    d = lr_differences(by_name[c.run], by_name[c.baseline])
    if len(d) > 1 and min(d.values()) < 0 < max(d.values()):
      notes.append("learning-rate sensitive: " + ", ".join(f"{v:+.3f} at {lr:.3g}" for lr, v in d.items()))
    notes += [f"`{n}`'s rate at the grid's edge" for n in (c.run, c.baseline)
              if by_name[n].grid and choose_lr(by_name[n].grid).at_edge]
    notes += [f"`{n}` near a bigram" for n in (c.run, c.baseline) if n in near]
    notes += [f"`{n}` = {shared[n]}" for n in (c.run, c.baseline) if n in shared]
    return f" ({'; '.join(notes)})" if notes else ""

  lines = ["", HEADING, "",
           "Written by `experiments/verdicts.py` from the tables above (the README's summaries are these lines). "
           f"Distinguishable: both Holm-corrected tests at {ALPHA:g}; Δ is run - baseline in nats (negative: "
           "better) with the family's simultaneous interval.", ""]
  lines += _final_loss(comparisons, caveats)
  if past_length:
    lines += _past_length(*past_length)
  lines += _benchmarks(benchmarks) + _baselines(results, baselines, near)
  lines += [_router(r) for r in results if r.health]
  if shared:
    lines.append("- **Shared trainings**, the same configs and seeds, not separate evidence: "
                 + "; ".join(f"`{n}` = {where}" for n, where in shared.items()) + ".")
  return lines


def _final_loss(comparisons: list[Comparison], caveats) -> list[str]:
  if not comparisons:
    return []
  n, m = min(c.n for c in comparisons), len(comparisons)
  if sign_flip_floor(n, m) > ALPHA:
    return [f"- **Final test loss: nothing can be called distinguishable** with {n} seeds over {m} comparisons (the "
            f"smallest Holm-adjusted sign-flip p is {sign_flip_floor(n, m):.3f})."]
  one = lambda c: (f"`{c.run}` vs `{c.baseline}` {c.mean:+.4f} [{c.ci_simultaneous[0]:+.4f}, "
                   f"{c.ci_simultaneous[1]:+.4f}]" + caveats(c))
  better = [one(c) for c in comparisons if c.distinguishable and c.mean < 0]
  worse = [one(c) for c in comparisons if c.distinguishable and c.mean > 0]
  neither = [f"`{c.run}` vs `{c.baseline}` {c.mean:+.4f}" + caveats(c) for c in comparisons if not c.distinguishable]
  most = max(c.n for c in comparisons)
  lines = [f"- **Final test loss, better** ({n if n == most else f'{n}-{most}'} paired seeds, {m} comparisons): "
           + ("; ".join(better) or "none") + ".",
           "- **Final test loss, worse**: " + ("; ".join(worse) or "none") + "."]
  return lines + ["- **Final test loss, not distinguishable**: " + ("; ".join(neither) or "none") + "."]


def _past_length(between: list[tuple[str, Comparison]], yarn: list[tuple[str, Comparison]]) -> list[str]:
  """One bullet per compared pair: at which lengths (and streamed) it is better, worse, or neither."""
  lines = []
  for label, family in (("Past the training length", between), ("YaRN at evaluation, against none", yarn)):
    pairs: dict[tuple[str, str], list[tuple[str, Comparison]]] = {}
    for measure, c in family:
      pairs.setdefault((c.run, c.baseline), []).append((measure, c))
    for (run, baseline), measured in pairs.items():
      kind = lambda test: [f"{m} {c.mean:+.4f}" for m, c in measured if test(c)]
      parts = [f"{word} at {', '.join(found)}" for word, found in (
          ("better", kind(lambda c: c.distinguishable and c.mean < 0)),
          ("worse", kind(lambda c: c.distinguishable and c.mean > 0)),
          ("not distinguishable", [m for m, c in measured if not c.distinguishable])) if found]
      who = f"`{run}`" if run == baseline else f"`{run}` vs `{baseline}`"
      lines.append(f"- **{label}**, {who}: " + "; ".join(parts) + ".")
  return lines


def _benchmarks(found) -> list[str]:
  """One bullet for the benchmark tasks' comparisons: better and worse in each metric's own direction."""
  if not found:
    return []
  kind = lambda c, higher: "not distinguishable" if not c.distinguishable else (
      "better" if (c.mean > 0) == higher else "worse")
  parts = []
  for word in ("better", "worse", "not distinguishable"):
    these = [f"`{c.run}` vs `{c.baseline}` {task} {metric} {c.mean:+.4f}" for task, metric, higher, c in found
             if kind(c, higher) == word]
    parts.append(f"{word}: " + ("; ".join(these) or "none"))
  return [f"- **Benchmark tasks** (lm-evaluation-harness, {len(found)} tests in their own Holm family): "
          + ". ".join(parts) + "."]


def _near_bigram(results, baselines: dict | None) -> dict[str, float]:
  """Runs whose mean final loss is within NEAR_BIGRAM of the bigram's (on one training's tokens), or above."""
  bigram = _by_order(baselines).get(2)
  if bigram is None:
    return {}
  return {r.name: r.mean for r in results if r.finals and r.mean > bigram - NEAR_BIGRAM}


def _by_order(baselines: dict | None) -> dict[int, float]:
  """The n-gram losses counted on one training's tokens, by order."""
  return {int(n): v for n, v in baselines["seen"].items()} if baselines else {}


def _baselines(results, baselines: dict | None, near: dict[str, float]) -> list[str]:
  if not baselines:
    return []
  seen = _by_order(baselines)
  order = min(seen, key=seen.get)
  finished = [r for r in results if r.finals]
  if not finished:
    return []
  best = min(finished, key=lambda r: r.mean)
  beat = [r for r in finished if r.mean < seen[order]]
  line = (f"- **Against count-based n-grams** on the same windows, counted on one training's tokens: the best n-gram "
          f"(order {order}) scores {seen[order]:.4f}; " + (
              f"{', '.join(f'`{r.name}`' for r in beat)} beat it (best `{best.name}` {best.mean - seen[order]:+.4f})"
              if beat else f"no run beats it (the best, `{best.name}`, is {best.mean - seen[order]:+.4f} above)"))
  if near:
    line += (f"; near a bigram ({seen[2]:.4f}, within {NEAR_BIGRAM:g} or above): "
             + ", ".join(f"`{n}` {v:.4f}" for n, v in near.items()) + ": little learned beyond it")
  return [line + "."]


def _router(r) -> str:
  """A mixture's router health: the worst single training at the end, and over the whole run after warm-up
  the trainings with a layer at the collapse value (one expert chosen by every token; logged loads are
  rounded, hence the tolerance) and the largest share of a layer's experts left unused."""
  E, k, collapse, seeds = r.spec.n_experts, r.spec.top_k, r.spec.collapse, sorted(r.seed_health)
  worst_entropy = min(seeds, key=lambda s: r.seed_health[s]["usage_entropy"])
  worst_load = max(seeds, key=lambda s: r.seed_health[s]["max_load_ratio"])
  full = [s for s, curve in r.load_curves.items() if any(step > r.warmup and v >= collapse * (1 - COLLAPSE_TOLERANCE)
                                                         for step, v in curve)]
  dead = {s: max((v for step, v in curve if step > r.warmup), default=0.0) for s, curve in r.dead_curves.items()}
  most = max(dead, key=dead.get)
  over = r.router_over_run()
  return (f"- **Router health, `{r.name}`** ({E} experts, top-{k}; collapse value {collapse:g}): at the end, the worst "
          f"training's usage entropy {r.seed_health[worst_entropy]['usage_entropy']:.3f} (seed {worst_entropy}) and worst "
          f"layer load {r.seed_health[worst_load]['max_load_ratio']:.2f} (seed {worst_load}); after warm-up, a layer at "
          f"the collapse value (one expert chosen by every token) at some logged step in {len(full)} of "
          f"{len(r.load_curves)} trainings{_seeds(full)}, up to {dead[most]:.1%} of a layer's experts unused (seed "
          f"{most}), and the worst seed past half of collapse at {over['past_half_share_worst_seed']:.0%} of its "
          "logged steps.")


def _seeds(seeds: list[int]) -> str:
  return f" (seed{'s' * (len(seeds) > 1)} {', '.join(map(str, sorted(seeds)))})" if seeds else ""


def _training(folder: Path) -> dict | None:
  path = folder / "config.json"
  if not path.is_file():
    return None
  try:  # filled with the defaults of fields added since, so older trainings compare
    full = RunConfig.from_dict(json.loads(path.read_text())).to_dict()
  except ConfigError:
    return None
  return {k: full[k] for k in SAME_TRAINING}


def shared_trainings(sweep_dir: Path, description: SweepDescription, by_name) -> dict[str, str]:
  """Runs whose compared trainings are another sweep's (a sibling folder with a sweep.json): the same
  config and seeds, and the same final losses. run -> "`<sweep folder>`'s `<run>` (seeds a-b)"."""
  others = [p.parent for p in sorted(sweep_dir.absolute().parent.glob("*/sweep.json")) if p.parent != sweep_dir.absolute()]
  found = {}
  for spec in description.runs:
    r = by_name[spec.name]
    mine = _training(sweep_dir / spec.name / "seed0")
    if mine is None or not r.finals:
      continue
    for other in others:
      for run_folder in sorted(p for p in other.iterdir() if (p / "seed0" / "config.json").is_file()):
        if _training(run_folder / "seed0") != mine:
          continue
        seeds = [s for s in sorted(r.finals) if _same_final(run_folder / f"seed{s}", r.finals[s])]
        if seeds:
          found[spec.name] = f"`{other.name}`'s `{run_folder.name}` (seeds {seeds[0]}-{seeds[-1]})"
  return found


def _same_final(folder: Path, final: float) -> bool:
  training = _training(folder)
  other = final_test(folder, training["train"]["steps"]) if training else None
  return other is not None and abs(other - final) < 1e-9
