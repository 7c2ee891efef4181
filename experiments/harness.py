"""python -m experiments.harness SWEEP_DIR --tasks hellaswag,arc_easy [--limit N] [--include-path DIR]

A sweep's compared trainings scored on lm-evaluation-harness tasks (gptoss_jax.lm_eval), each final
checkpoint once per task: FOLDER/harness.json ({task: {metric: value}}, with the harness's standard errors
and which way is better), kept with the training's small files. `python -m experiments.report SWEEP_DIR
--harness-tasks ...` runs what is missing and adds the scores as further paired comparisons: each run
against its baseline, seed by seed, per task and metric, one Holm family of their own. Not at `tiny`
scale: its models read bytes of Shakespeare, and the harness's tasks are English benchmarks they cannot
read (chance is all they would measure). Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from experiments.description import SweepDescription
from experiments.folders import HARNESS_FILE as FILE
from experiments.paired import ALPHA, compare, corrected
from gptoss_jax.config import ConfigError
from gptoss_jax.fileio import atomic_write

SKIPPED_SCALES = {"tiny": "its models read bytes of Shakespeare; the harness's tasks are English benchmarks they "
                          "cannot read, so their scores would all be chance"}


def score(folder: Path, tasks: list[str], manager, limit: float | None = None) -> dict:
  """{task: {metric: value, metric_stderr: value, "higher_is_better": {metric: bool}}} of one checkpoint, the
  tasks from `manager` (the harness's TaskManager)."""
  import lm_eval
  from gptoss_jax.lm_eval.model import HarnessModel
  results = lm_eval.simple_evaluate(model=HarnessModel(ckpt=str(folder)), tasks=tasks, limit=limit,
                                    task_manager=manager, log_samples=False)
  out = {}
  for task, values in results["results"].items():
    metrics = {k.split(",")[0]: v for k, v in values.items() if "," in k and isinstance(v, (int, float))}
    out[task] = metrics | {"higher_is_better": results.get("higher_is_better", {}).get(task, {})}
  return out


def missing(sweep_dir: Path, tasks: list[str]) -> list[Path]:
  """The sweep's compared trainings with a checkpoint whose harness.json lacks one of `tasks`."""
  def has(folder: Path) -> bool:
    path = folder / FILE
    return path.is_file() and set(tasks) <= set(json.loads(path.read_text()))
  return sorted(p for p in sweep_dir.glob("*/seed*") if (p / "checkpoints").is_dir() and not has(p))


def run(sweep_dir: Path, description: SweepDescription, tasks: list[str], limit: float | None = None,
        include_path: str = "") -> int:
  """Scores what is missing (refused at a scale SKIPPED_SCALES names); returns how many trainings it scored."""
  if description.scale in SKIPPED_SCALES:
    raise ConfigError(f"no harness scores at {description.scale} scale: {SKIPPED_SCALES[description.scale]}")
  todo = missing(sweep_dir, tasks)
  if not todo:
    return 0
  from gptoss_jax.lm_eval.model import task_manager
  manager = task_manager(tasks, include_path)  # indexes the harness's tasks (8 s) once, unless all are local
  unknown = [t for t in tasks if t not in manager.all_tasks]
  if unknown:
    raise ConfigError(f"unknown harness task(s): {', '.join(unknown)}")
  for i, folder in enumerate(todo):
    path = folder / FILE
    kept = json.loads(path.read_text()) if path.is_file() else {}
    atomic_write(path, json.dumps(kept | score(folder, tasks, manager, limit), indent=1))
    print(f"harness {i + 1}/{len(todo)}: {folder}", file=sys.stderr)
  return len(todo)


def scored(sweep_dir: Path, description: SweepDescription, tasks: list[str], limit: float | None = None) -> list:
  """What the report adds for `tasks`: the missing scores made (not at a scale SKIPPED_SCALES names), then
  every comparison (`comparisons`); [] without tasks."""
  if not tasks:
    return []
  if description.scale not in SKIPPED_SCALES:
    run(sweep_dir, description, tasks, limit)
  return comparisons(load(sweep_dir, description), description)


def load(sweep_dir: Path, description: SweepDescription) -> dict[str, dict[int, dict]]:
  """run -> compared seed -> its harness.json, for the runs that have any."""
  out = {}
  for spec in description.runs:
    found = {int(p.parent.name[4:]): json.loads(p.read_text())
             for p in (sweep_dir / spec.name).glob(f"seed*/{FILE}") if p.parent.name[4:].isdigit()}
    if found:
      out[spec.name] = dict(sorted(found.items()))
  return out


def comparisons(scores: dict[str, dict[int, dict]], description: SweepDescription):
  """[(task, metric, higher is better, Comparison)], each run against its baseline on the seeds both have,
  Holm over the whole family. Δ = run - baseline, as every comparison of the report."""
  baseline = {r.name: r.baseline for r in description.runs}
  found = []
  for run, seeds in scores.items():
    base = scores.get(baseline.get(run, ""), {})
    common = sorted(set(seeds) & set(base))
    if len(common) < 2:
      continue
    for task, metrics in seeds[common[0]].items():
      for metric, value in metrics.items():
        if metric == "higher_is_better" or metric.endswith("_stderr") or not isinstance(value, (int, float)):
          continue
        d = np.array([seeds[s][task][metric] - base[s][task][metric] for s in common])
        found.append((task, metric, metrics.get("higher_is_better", {}).get(metric, True), compare(run, baseline[run], d)))
  fixed = corrected([c for *_, c in found])
  return [(task, metric, higher, c) for (task, metric, higher, _), c in zip(found, fixed)]


def section(description: SweepDescription, tasks: list[str], found) -> list[str]:
  """The report's section for the harness scores' comparisons (`comparisons`), or why there are none."""
  if not tasks:
    return []
  if description.scale in SKIPPED_SCALES:
    return ["", "## Benchmark tasks (lm-evaluation-harness)", "",
            f"Not scored at `{description.scale}` scale: {SKIPPED_SCALES[description.scale]}."]
  header = ("| task | metric | better | run | vs | n | Δ | 95% CI | p (t) | p (sign-flip) | Holm p (t) | "
            "Holm p (sign-flip) | simultaneous CI | verdict |")
  lines = ["", "## Benchmark tasks (lm-evaluation-harness)", "",
           f"Each compared training's final checkpoint scored by the harness (`experiments.harness`) on "
           f"{', '.join(f'`{t}`' for t in tasks)}; each run against its baseline, seed by seed, per task and metric "
           f"(Δ = run - baseline: where higher is better, a positive Δ is better): one family of {len(found)} tests, "
           f"Holm over both tests at {ALPHA:g}, simultaneous intervals at 1 - {ALPHA:g} / {len(found)}.", "",
           header, "|---" * 14 + "|"]
  lines += [f"| {task} | {metric} | {'higher' if higher else 'lower'} | {c.run} | {c.baseline} | {c.cells(higher)}"
            for task, metric, higher, c in found]
  return lines


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.harness", description=__doc__.split("\n\n")[0])
  parser.add_argument("sweep_dir", help="the folder experiments.run wrote (holds sweep.json)")
  parser.add_argument("--tasks", required=True, help="comma-separated harness task names")
  parser.add_argument("--limit", type=float, default=None, help="at most this many documents per task")
  parser.add_argument("--include-path", default="", help="a folder of task YAML files of one's own")
  args = parser.parse_args(argv)
  sweep_dir = Path(args.sweep_dir)
  try:
    if not (sweep_dir / "sweep.json").is_file():
      raise ConfigError(f"{sweep_dir} is not a sweep folder (no sweep.json; experiments.run writes it)")
    n = run(sweep_dir, SweepDescription.load(sweep_dir / "sweep.json"), args.tasks.split(","), args.limit,
            args.include_path)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{n} training(s) scored", file=sys.stderr)
  return 0


if __name__ == "__main__":
  from gptoss_jax import runtime
  runtime.configure()
  sys.exit(main())
