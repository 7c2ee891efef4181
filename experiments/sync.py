"""A sweep's results folder (`--results`, committed as trainings finish): each finished training's small files
kept there, and taken back by a later call (maybe on another machine), which then trains only what is missing."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from experiments.description import SweepDescription
from experiments.folders import SMALL_FILES, finished
from gptoss_jax.config import ConfigError


def keep(folder: Path, sweep_dir: Path, results: Path) -> None:
  """Copies a finished training's small files (and sweep.json) into the results folder, at the same place."""
  dst = results / folder.relative_to(sweep_dir)
  dst.mkdir(parents=True, exist_ok=True)
  for name in SMALL_FILES:
    if (folder / name).is_file():
      shutil.copy2(folder / name, dst / name)
  shutil.copy2(sweep_dir / "sweep.json", results / "sweep.json")


def take_kept(results: Path, sweep_dir: Path, description: SweepDescription) -> int:
  """Copies the finished trainings kept in `results` (by an earlier call, maybe on another machine) into the
  sweep folder, where the scheduler then skips them; returns how many. A results folder of another sweep
  description (other runs, grid, overrides or selection seeds) is refused."""
  if not (results / "sweep.json").is_file():
    return 0
  kept, now = (_what_trains(d).to_dict() for d in (SweepDescription.load(results / "sweep.json"), description))
  differ = sorted(k for k in set(kept) | set(now) if kept.get(k) != now.get(k))
  if differ:
    raise ConfigError(f"--results {results} holds another sweep (it differs in {', '.join(differ)}); give another folder")
  taken = _finished_only_in(results, sweep_dir, description)
  for sub, folder in taken:
    folder.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:
      if (sub / name).is_file():
        shutil.copy2(sub / name, folder / name)
  return len(taken)


def _what_trains(description: SweepDescription) -> SweepDescription:
  """A description without what does not change its trainings: the number of compared seeds (more may be
  added) and the FLOPs estimate (its method may improve)."""
  runs = tuple(dataclasses.replace(r, flops_per_token=0.0) for r in description.runs)
  return dataclasses.replace(description, seeds=0, runs=runs)


def _finished_only_in(src: Path, dst: Path, description: SweepDescription) -> list[tuple[Path, Path]]:
  """(training in src, the same place in dst) for each training of the sweep finished in src and not in dst."""
  pairs = []
  for folder in sorted(p.parent for p in src.glob("*/*/metrics.jsonl")):
    spec = description.run(folder.parent.name)
    other = dst / folder.relative_to(src)
    if spec and finished(folder, spec.steps) and not finished(other, spec.steps):
      pairs.append((folder, other))
  return pairs


def keep_unkept(sweep_dir: Path, results: Path, description: SweepDescription) -> int:
  """Keeps the sweep folder's finished trainings that `results` lacks (one that ended while the runner was
  being stopped was never kept); returns how many."""
  unkept = _finished_only_in(sweep_dir, results, description)
  for folder, _ in unkept:
    keep(folder, sweep_dir, results)
  return len(unkept)
