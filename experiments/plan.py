"""A sweep's plan: its description (every run's config resolved, its parameters, FLOPs and budget: sweep.json)
and which trainings can start now (a run's learning-rate grid on its selection seeds first, widened at an edge,
then its compared seeds at the chosen value)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from experiments.description import RunSpec, SweepDescription
from experiments.folders import (EVALUATION_FILE, Choice, choose_lr, finished, grid_trainings, lr_dir, run_dir,
                                 selection_losses)
from experiments.sweeps import SCALES, Run, Sweep
from gptoss_jax.inspect import stats

WIDEN = 2  # default: grid values added beyond an edge before the run goes on (and the report flags it)


def describe(sweep: Sweep, extra: dict[str, str], seeds: int, lrs: tuple[float, ...]) -> SweepDescription:
  """sweep.json: what the report needs besides the metrics. Resolving every run's config here also
  checks the command-line overrides before anything trains."""
  runs = []
  for run in sweep.runs:
    config = sweep.config(run, 0, lrs[0], extra)
    cfg = config.model
    s = stats(cfg, config.data.seq_len)
    tokens = config.train.batch_size * config.data.seq_len * config.train.steps
    runs.append(RunSpec(run.name, tuple(run.changes), run.baseline, run.note, s.total_params, s.active_params,
                        s.train_flops_per_token, cfg.n_experts, cfg.top_k, config.train.steps, config.train.stop_at,
                        tokens, config.train.batch_size * config.data.seq_len))
  scale = SCALES[sweep.scale]
  return SweepDescription(sweep.name, sweep.scale, tuple(runs), seeds, tuple(lrs), tuple(scale.selection_seeds),
                          dict(extra), scale.min_tokens_per_active_param)


def table(description: SweepDescription) -> str:
  lines = [f"{'run':<18} {'changes':<44} {'params':>10} {'active':>10} {'train FLOPs/token':>18} "
           f"{'tokens/active':>14}"]
  for r in description.runs:
    lines.append(f"{r.name:<18} {','.join(r.changes) or '-':<44.44} {r.total_params:>10,} "
                 f"{r.active_params:>10,} {r.flops_per_token:>18,.0f} {r.tokens / r.active_params:>14.1f}")
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Job:
  run: Run
  seed: int
  lr: float
  folder: Path
  evaluate: bool = False  # the sweep's evaluation of a finished compared training, not a training


class Scheduler:
  """Which trainings can start now: a run's learning-rate grid first, then (once its grid is done and
  its best value is inside the grid) its compared seeds at the chosen value."""

  def __init__(self, sweep: Sweep, sweep_dir: Path, description: SweepDescription, widen: int = WIDEN):
    self.sweep, self.dir, self.d, self.widen = sweep, sweep_dir, description, widen
    self.specs = {r.name: r for r in description.runs}
    self.failed: set[str] = set()  # runs with a failed training: nothing more of them is started

  def steps(self, run: Run) -> int:
    return self.specs[run.name].steps

  def target(self, run: Run) -> int:
    """Where this call's trainings stop: train.stop_at if set, else the last step."""
    return self.specs[run.name].stop_at or self.steps(run)

  def tuned(self) -> bool:
    return self.d.tuned

  def choice(self, run: Run) -> Choice | None:
    """The run's learning rate once every value tried has finished on every selection seed (None before)."""
    if not self.tuned():
      return Choice(self.d.lrs[0], {}, None, False)
    seeds = self.d.selection_seeds
    losses = selection_losses(self.dir / run.name, self.steps(run), seeds)
    tried = set(self.d.lrs) | {lr for lr, _ in grid_trainings(self.dir / run.name, seeds[0])}
    if any(len(losses.get(lr, {})) < len(seeds) for lr in tried):
      return None
    return choose_lr({lr: sum(losses[lr][s] for s in seeds) / len(seeds) for lr in tried})

  def jobs(self) -> list[Job]:
    """Every training that is known now to be needed, finished or not."""
    out = []
    seeds = self.d.selection_seeds
    for run in self.sweep.runs:
      if self.tuned():
        tried = sorted(set(self.d.lrs) | {lr for lr, _ in grid_trainings(self.dir / run.name, seeds[0])})
        out += [Job(run, seed, lr, lr_dir(self.dir, run.name, lr, seed)) for lr in tried for seed in seeds]
      choice = self.choice(run)
      if choice is None:
        continue
      widened = len(choice.losses) - len(self.d.lrs)
      if choice.widen is not None and widened < self.widen:
        out += [Job(run, seed, choice.widen, lr_dir(self.dir, run.name, choice.widen, seed)) for seed in seeds]
      else:
        out += [Job(run, seed, choice.lr, run_dir(self.dir, run.name, seed)) for seed in range(self.d.seeds)]
    return out

  def ready(self, running: set[Path]) -> list[Job]:
    """Unfinished trainings, and the sweep's evaluation of each compared training finished without it."""
    out = []
    for j in self.jobs():
      if j.run.name in self.failed or j.folder in running:
        continue
      if not finished(j.folder, self.target(j.run)):
        out.append(j)
      elif (self.sweep.evaluation and j.folder == run_dir(self.dir, j.run.name, j.seed)
            and self.target(j.run) == self.steps(j.run) and not (j.folder / EVALUATION_FILE).is_file()):
        out.append(dataclasses.replace(j, evaluate=True))
    return out

  def total_steps(self) -> int:
    """Steps of every training the sweep will need as far as known (a widened grid adds to it)."""
    per_run = self.d.trainings_per_run
    return sum(spec.steps * per_run for spec in self.specs.values())
