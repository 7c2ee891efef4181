"""What a sweep's folder holds, read by the runner and the report alike: each training's folder
(`<run>/seed<k>` compared, `<run>/lr<value>-seed<k>` learning-rate selection), its logged metrics, whether it
finished, the selection losses and the learning rate they choose."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

EVALUATION_FILE = "evaluation.json"  # what a sweep's evaluation module writes into a compared training's folder
HARNESS_FILE = "harness.json"  # a compared training's benchmark scores (experiments.harness)
SMALL_FILES = ("config.json", "metrics.jsonl", "heldout.json", EVALUATION_FILE, HARNESS_FILE)  # what a report
# needs of a training


def run_dir(sweep_dir: Path, run: str, seed: int) -> Path:
  return sweep_dir / run / f"seed{seed}"


def lr_dir(sweep_dir: Path, run: str, lr: float, seed: int) -> Path:
  return sweep_dir / run / f"lr{lr:.3g}-seed{seed}"


def three_digits(lr: float) -> float:
  """Learning rates are kept to 3 significant digits, as their folders name them."""
  return float(f"{lr:.3g}")


def metrics(folder: Path) -> list[dict]:
  path = folder / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def last_step(folder: Path) -> int:
  return max((r["step"] for r in metrics(folder)), default=0)


def final_eval(folder: Path, steps: int, key: str = "eval/loss") -> float | None:
  """The validation loss (or another logged metric) at the last step, or None if the training has not
  finished."""
  done = [r[key] for r in metrics(folder) if r["step"] >= steps and key in r]
  return done[-1] if done else None


def final_test(folder: Path, steps: int) -> float | None:
  """A finished training's test loss (its validation loss for trainings from before the test split)."""
  test = final_eval(folder, steps, "test/loss")
  return test if test is not None else final_eval(folder, steps)


def finished(folder: Path, steps: int) -> bool:
  """The training reached step `steps` and evaluated there: its validation loss and, at its last step with a
  test split (all but trainings from before it), its test loss and the per-batch losses of `heldout.json`
  (the loop writes them last, so a training killed in between is not finished)."""
  logged = {key for row in metrics(folder) if row["step"] >= steps for key in row}
  if "eval/loss" not in logged:
    return False
  path = folder / "config.json"
  config = json.loads(path.read_text()) if path.is_file() else {}
  if "test_fraction" not in config.get("data", {}) or steps < config.get("train", {}).get("steps", steps):
    return True
  return "test/loss" in logged and (folder / "heldout.json").is_file()


def grid_trainings(folder: Path, default_seed: int) -> dict[tuple[float, int], Path]:
  """One run's learning-rate trainings: (value, selection seed) -> folder. Folders are `lr<value>-seed<k>`
  (`lr<value>` in sweeps from before there were several selection seeds: `default_seed`'s)."""
  out = {}
  for p in sorted(folder.glob("lr*")):
    lr, _, seed = p.name[2:].partition("-seed")
    if p.is_dir():
      out[(float(lr), int(seed) if seed else default_seed)] = p
  return out


def selection_losses(folder: Path, steps: int, seeds: list[int]) -> dict[float, dict[int, float]]:
  """Validation loss of every finished learning-rate training of a run: value -> selection seed -> loss."""
  out: dict[float, dict[int, float]] = {}
  for (lr, seed), sub in grid_trainings(folder, seeds[0]).items():
    if (loss := final_eval(sub, steps)) is not None:
      out.setdefault(lr, {})[seed] = loss
  return dict(sorted(out.items()))


@dataclasses.dataclass(frozen=True)
class Choice:
  lr: float  # the grid value with the lowest held-out loss
  losses: dict[float, float]  # every grid value tried -> its held-out loss
  widen: float | None  # the next value to try when the best one is at an edge of the grid, else None
  at_edge: bool  # the best value is the smallest or largest tried


def choose_lr(losses: dict[float, float]) -> Choice:
  """The grid value with the lowest loss (the selection seeds' mean validation loss); if it is the smallest
  or largest value tried, the next value beyond it on the grid's own spacing (ratio of the two values
  nearest that edge)."""
  grid = sorted(losses)
  best = min(grid, key=lambda lr: losses[lr])
  at_edge = len(grid) > 1 and best in (grid[0], grid[-1])
  widen = None
  if at_edge:
    widen = three_digits(best * best / grid[1] if best == grid[0] else best * best / grid[-2])
  return Choice(best, dict(sorted(losses.items())), widen, at_edge)
