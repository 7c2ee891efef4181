"""A sweep's description (`sweep.json`), typed: what its trainings are and what a report needs besides their
metrics. Written by the runner, read by the report, the TensorBoard export, the evaluations and benchmarks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class RunSpec:
  name: str
  changes: tuple[str, ...] = ()  # the model fields the run sets, relative to its baseline
  baseline: str = ""  # the run it is compared with, "" for none
  note: str = ""
  total_params: int = 0
  active_params: int = 0
  flops_per_token: float = 0.0  # training FLOPs per token (gptoss_jax.inspect)
  n_experts: int = 0
  top_k: int = 1
  steps: int = 0
  stop_at: int = 0  # where this call's trainings stop (0: the last step)
  tokens: int = 0  # training tokens of one training
  tokens_per_step: int = 0

  @property
  def collapse(self) -> float:
    """A router's max_load_ratio when every token goes to the same top_k experts."""
    return self.n_experts / self.top_k


@dataclasses.dataclass(frozen=True)
class SweepDescription:
  sweep: str
  scale: str
  runs: tuple[RunSpec, ...]
  seeds: int = 0  # compared seeds 0..seeds-1
  lrs: tuple[float, ...] = ()  # the learning-rate grid (one value: no tuning)
  selection_seeds: tuple[int, ...] = (1000,)  # the learning rate is chosen on these seeds' mean validation loss
  overrides: dict = dataclasses.field(default_factory=dict)  # command-line overrides, as typed there
  min_tokens_per_active_param: float = 0.0
  # runs whose comparison the overrides changed, let through by --allow-changed-runs (sweeps.broken_by)
  changed_runs: tuple[str, ...] = ()

  def run(self, name: str) -> RunSpec | None:
    return next((r for r in self.runs if r.name == name), None)

  @property
  def tuned(self) -> bool:
    return len(self.lrs) > 1

  @property
  def trainings_per_run(self) -> int:
    """Trainings each run needs at least (a grid widened at an edge adds selection trainings)."""
    return len(self.lrs) * len(self.selection_seeds) * self.tuned + self.seeds

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> SweepDescription:
    """From sweep.json's dict; a field it lacks takes its default (sweeps from before `selection_seeds` name
    one `selection_seed`)."""
    d = dict(d)
    if "selection_seeds" not in d and "selection_seed" in d:
      d["selection_seeds"] = [d.pop("selection_seed")]
    d.pop("selection_seed", None)
    runs = tuple(RunSpec(**{**r, "changes": tuple(r.get("changes", ()))}) for r in d.pop("runs", ()))
    tuples = {k: tuple(d[k]) for k in ("lrs", "selection_seeds", "changed_runs") if k in d}
    return cls(d.pop("sweep", ""), d.pop("scale", ""), runs, **{**d, **tuples})

  def save(self, path: Path) -> None:
    Path(path).write_text(json.dumps(self.to_dict(), indent=1))

  @classmethod
  def load(cls, path: Path) -> SweepDescription:
    return cls.from_dict(json.loads(Path(path).read_text()))
