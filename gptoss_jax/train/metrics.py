"""Logging: TensorBoard scalars and HParams (tensorboardX), the same metrics as JSON lines, and MFU."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.fileio import atomic_write

# dense bf16 peak FLOP/s per device, by substring of jax's device_kind
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
    "V100": 125e12, "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v4": 275e12, "TPU v3": 123e12,
}


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, str]:
  """(FLOP/s, where it came from): the config's value, a known accelerator's, or measured on CPU."""
  if configured > 0:
    return configured, "config"
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops, f"{kind} bf16 peak"
  return measured_matmul_flops(), f"{kind}: measured float32 matmul rate"


def measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
  """Achievable matmul FLOP/s of one device (used where no peak is known, e.g. CPU)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    f(a).block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - start)


def peak_memory_bytes() -> int:
  """Peak memory so far: the largest device's peak allocation where the backend reports one (GPU, TPU),
  else (CPU) this process's peak resident set."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices()]
  if max(peaks, default=0) > 0:
    return max(peaks)
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def router_health(load_LxE: np.ndarray) -> dict[str, float]:
  """Per MoE layer, from the share of routed assignments each expert got: max_load_ratio (E x the largest
  share; 1 when balanced, E / top_k when one expert is in every token's top-k), usage_entropy (entropy of
  the shares / log E; 1 when balanced) and dead_experts (share of experts that got no assignment)."""
  load = np.asarray(load_LxE, np.float64)
  E = load.shape[-1]
  p_log_p = np.where(load > 0, load * np.log(np.where(load > 0, load, 1.0)), 0.0)
  health = {}
  for layer, (row, plogp) in enumerate(zip(load, p_log_p)):
    health[f"moe/max_load_ratio/layer{layer:02d}"] = float(row.max() * E)
    health[f"moe/usage_entropy/layer{layer:02d}"] = float(-plogp.sum() / np.log(E))
    health[f"moe/dead_experts/layer{layer:02d}"] = float(np.mean(row == 0))
  return health


def summary_writer(logdir: Path, **kwargs):
  """tensorboardX's SummaryWriter, imported without torch: where torch is installed tensorboardX imports it
  (2 s of every training's start) only to accept torch tensors, which nothing here writes."""
  if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
      import tensorboardX  # noqa: F401
    finally:
      del sys.modules["torch"]
  from tensorboardX import SummaryWriter
  return SummaryWriter(str(logdir), **kwargs)


class MetricsLogger:
  """Writes on process 0 only; every other process gets a logger that does nothing. A run resumed from
  step `resume_step` first drops what an earlier process logged past it (metrics.jsonl rows, and
  TensorBoard events through purge_step), so the logs read as one uninterrupted run."""

  def __init__(self, workdir: Path, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    path = workdir / "metrics.jsonl"
    if path.is_file():
      atomic_write(path, "".join(line + "\n" for line in path.read_text().splitlines()
                                 if _step_of(line) is not None and _step_of(line) <= resume_step))
    purge = resume_step + 1 if (workdir / "tb").is_dir() else None
    self.writer = summary_writer(workdir / "tb", purge_step=purge)
    self.jsonl = open(path, "a")

  def hparams(self, hparams: dict, group: str, metrics: tuple[str, ...] = ("eval/loss", "train/loss")) -> None:
    if self.enabled:
      for summary in hparams_summaries(hparams, group, metrics):
        self.writer.file_writer.add_summary(summary)

  def write(self, step: int, scalars: dict[str, float], histograms: dict[str, np.ndarray] | None = None) -> None:
    if not self.enabled:
      return
    for name, value in scalars.items():
      self.writer.add_scalar(name, value, step)
    for name, values in (histograms or {}).items():
      self.writer.add_histogram(name, np.asarray(values), step)
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self.writer.close()
      self.jsonl.close()


# HParamInfo.differs (field 7, a bool) of TensorBoard's hparams proto, which tensorboardX's copy lacks: kept
# as an unknown field and written out as such
DIFFERS = bytes([7 << 3 | 0, 1])


def hparams_summaries(hparams: dict, group: str, metrics: tuple[str, ...], differs: tuple[str, ...] = ()) -> list:
  """TensorBoard HParams summaries of one training: numbers, booleans and strings as such (anything else
  as its text), and the session put in `group`: TensorBoard aggregates a group's sessions (the seeds of
  one run) into one row of its table. The `differs` fields are marked so: TensorBoard's table shows 5
  columns until more are ticked, those marked first."""
  from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
  from tensorboardX.summary import hparams as hparams_summary
  clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
  experiment, start, end = hparams_summary(clean, {m: 0.0 for m in metrics})
  for summary, edit in ((start, lambda c: setattr(c.session_start_info, "group_name", group)),
                        (experiment, lambda c: [info.MergeFromString(DIFFERS)
                                                for info in c.experiment.hparam_infos if info.name in differs])):
    plugin = summary.value[0].metadata.plugin_data
    content = HParamsPluginData.FromString(plugin.content)
    edit(content)
    plugin.content = content.SerializeToString()
  return [experiment, start, end]


def run_names(workdir: Path) -> tuple[str, str]:
  """(run name, session group) of a training folder: a sweep's <run>/seed<k> is named so and grouped
  with the other seeds of <run>; any other folder is its own."""
  if workdir.name.startswith("seed") and workdir.name[4:].isdigit():
    return f"{workdir.parent.name}/{workdir.name}", workdir.parent.name
  if workdir.name.startswith("lr"):
    return f"{workdir.parent.name}/{workdir.name}", f"{workdir.parent.name}/{workdir.name}"
  return workdir.name, workdir.name


def _step_of(line: str) -> int | None:
  """The step of a metrics.jsonl row; None for a line a killed process left half-written."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return None


def plot_losses(workdir: Path) -> Path:
  """DIR/loss.png: train and eval loss against steps, from DIR/metrics.jsonl."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for key, label in (("train/loss", "train"), ("eval/loss", "eval (held out)")):
    points = sorted({r["step"]: r[key] for r in rows if key in r}.items())
    if points:
      ax.plot(*zip(*points), label=label, marker="o" if key.startswith("eval") else None, markersize=3)
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats / token)")
  ax.set_title(workdir.name)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(workdir / "loss.png")
  plt.close(fig)
  return workdir / "loss.png"
