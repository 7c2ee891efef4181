"""Where the trainings of a sweep run: the host's CPUs split between concurrent trainings, and its GPUs in
groups (CUDA_VISIBLE_DEVICES); a TPU host runs one training at a time."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

from gptoss_jax.config import ConfigError


def cpu_sets(jobs: int) -> list[set[int]]:
  """This process's CPUs split into `jobs` disjoint sets (each training runs on its own cores)."""
  cpus = sorted(os.sched_getaffinity(0))
  if jobs > len(cpus):
    raise ConfigError(f"--jobs {jobs} is more than the {len(cpus)} CPUs this process may use")
  return [set(cpus[i::jobs]) for i in range(jobs)]


def visible_gpus() -> list[str]:
  """The GPUs this host shows (CUDA_VISIBLE_DEVICES if set, else nvidia-smi's list), without starting JAX
  (which would take most of every GPU's memory in this process)."""
  if "CUDA_VISIBLE_DEVICES" in os.environ:
    return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
  if shutil.which("nvidia-smi") is None:
    return []
  out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True)
  return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one training runs: its CPUs and the environment that gives it its own accelerator(s)."""
  cpus: frozenset[int]
  env: dict[str, str]


def tpu_host() -> bool:
  """Whether this host has TPU chips (their device files) or the TPU runtime installed."""
  return any(Path("/dev").glob("accel*")) or importlib.util.find_spec("libtpu") is not None


def slots(jobs: int, devices_per_job: int, gpus: list[str]) -> list[Slot]:
  """One slot per concurrent training. With GPUs: slot i gets the i-th group of `devices_per_job` of them
  (CUDA_VISIBLE_DEVICES, set before the training starts JAX); more jobs than groups share the groups round
  robin, and then each sharing training takes only its share of the memory (JAX would preallocate 75% of a
  GPU in every process). Without GPUs (CPU; TPU hosts run one training per host): the CPUs split as before."""
  cpus = cpu_sets(jobs)
  if not gpus:
    return [Slot(frozenset(c), {}) for c in cpus]
  groups = [gpus[i:i + devices_per_job] for i in range(0, len(gpus) - devices_per_job + 1, devices_per_job)]
  if not groups:
    raise ConfigError(f"--devices-per-job {devices_per_job} is more than the {len(gpus)} GPUs this host shows")
  sharing = -(-jobs // len(groups))
  out = []
  for i, c in enumerate(cpus):
    env = {"CUDA_VISIBLE_DEVICES": ",".join(groups[i % len(groups)])}
    if sharing > 1:
      env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / sharing:.3f}"
    out.append(Slot(frozenset(c), env))
  return out
