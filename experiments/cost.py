"""What a sweep will cost before it runs: accelerator-hours on a named device at an assumed MFU, each
training's peak memory (gptoss_jax.inspect's estimate) against the device's, with what to change when it
does not fit, and the disk its checkpoints take. `python -m experiments.run <sweep> --scale S --dry-run
--device h100 [--mfu 0.3]`."""

from __future__ import annotations

import dataclasses
import math

from experiments.description import SweepDescription
from experiments.sweeps import Sweep
from gptoss_jax.config import ConfigError, RunConfig
from gptoss_jax.inspect import train_memory_bytes

DEFAULT_MFU = 0.3  # small LMs typically reach 30-50% of peak on one accelerator; override with --mfu
FIT = 0.9  # a training fits when its estimate is within this share of the device's memory


@dataclasses.dataclass(frozen=True)
class Device:
  peak_flops: float  # dense bf16 FLOP/s per chip, no sparsity
  memory_gib: float


DEVICES = {
    "h100": Device(989e12, 80), "h200": Device(989e12, 141), "a100": Device(312e12, 80),
    "a100-40gb": Device(312e12, 40), "l4": Device(121e12, 24), "tpu-v4": Device(275e12, 32),
    "tpu-v5e": Device(197e12, 16), "tpu-v5p": Device(459e12, 95),
}


def device(name: str) -> Device:
  if name not in DEVICES:
    raise ConfigError(f"unknown --device {name!r} (devices: {', '.join(DEVICES)})")
  return DEVICES[name]


def state_shards(config: RunConfig, devices: int) -> int:
  """The devices a training's state is split over: fsdp x expert (`embed` over both outside the experts, the
  experts over `expert`), either -1 taking the rest of `devices`."""
  sizes = dataclasses.asdict(config.mesh)
  rest = max(1, devices // math.prod(n for n in sizes.values() if n != -1))
  return math.prod(rest if sizes[axis] == -1 else sizes[axis] for axis in ("fsdp", "expert"))


def memory_gib(config: RunConfig, devices: int = 1, microbatches: int = 0, remat: bool | None = None) -> float:
  """One device's estimated peak in a training of `config` spread over `devices` (data parallel; fsdp and
  expert parallelism shard the state when the mesh asks for them)."""
  t = config.train
  microbatches = microbatches or t.microbatches
  tokens = t.batch_size * config.data.seq_len // (devices * microbatches)
  shards = state_shards(config, devices)
  return train_memory_bytes(config.model, config.data.seq_len, tokens, t.remat if remat is None else remat,
                            shards) / 2**30


def advice(config: RunConfig, dev: Device, devices: int = 1) -> str:
  """"" when the training fits the device, else the smallest change that makes it fit by the estimate:
  rematerialization, then microbatches (gradient accumulation), else sharding the state over devices."""
  limit = FIT * dev.memory_gib
  if memory_gib(config, devices) <= limit:
    return ""
  if not config.train.remat and memory_gib(config, devices, remat=True) <= limit:
    return "--config.train.remat=true"
  m = config.train.microbatches
  while m < config.train.batch_size // devices:
    m *= 2
    if config.train.batch_size % (devices * m) == 0 and memory_gib(config, devices, m, True) <= limit:
      return f"--config.train.remat=true --config.train.microbatches={m}"
  return "does not fit one device even one sequence at a time: shard the state (--config.mesh.fsdp=-1 over several)"


def program_costs(config: RunConfig, platform: str, devices: int = 1) -> tuple[float, float]:
  """Training FLOPs per token and one device's peak memory (GiB), read from the training step's own program with
  `platform`'s choices (model.platform), traced in this process for one device's share of the batch (data
  parallel over `devices`): the FLOPs of its matmuls as that platform's XLA compiles them (gptoss_jax.hlo; where
  a GPU would call cuDNN's attention, a CPU-only process traces the blockwise kernel: the same products, whole
  blocks on the diagonal), the memory by XLA's memory analysis of the same program compiled for this CPU
  (buffers as XLA:CPU assigns them), less the part of the state that fsdp's shards do not hold."""
  import jax
  import jax.numpy as jnp
  from gptoss_jax import hlo
  from gptoss_jax.sharding import make_mesh
  from gptoss_jax.train.step import Trainer
  batch, seq_len = config.train.batch_size // devices, config.data.seq_len
  trainer = Trainer(config.model.replace(platform=platform), config.train, make_mesh({}, jax.devices()[:1]))
  tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32, sharding=trainer.batch_sharding)
  traced = trainer.train_step.trace(trainer.abstract_state(), tokens)
  lowering = {"gpu": "cuda"}.get(platform, platform)
  found = hlo.matmuls(traced.lower(lowering_platforms=(lowering,)).as_text(), lowering)
  if any(m.flops is None or m.trips is None for m in found):
    raise ConfigError(f"the {platform} program's FLOPs cannot all be counted (a loop the routing bounds, or a "
                      "kernel that declares no cost): leave out --from-program")
  m = traced.lower().compile().memory_analysis()
  state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state()))
  shards = state_shards(config, devices)
  peak = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  return sum(x.flops for x in found) / (batch * seq_len), (peak - state * (1 - 1 / shards)) / 2**30


def estimate(config: RunConfig, flops_per_token: float, dev: Device, mfu: float, devices: int = 1,
             memory: float | None = None) -> dict:
  """One training's FLOPs, device-hours at `mfu`, peak memory per device (`memory`, or the estimate) and fit."""
  tokens = config.train.batch_size * config.data.seq_len * config.train.steps
  flops = flops_per_token * tokens
  memory = memory_gib(config, devices) if memory is None else memory
  return {"train_flops": flops, "device_hours": flops / (dev.peak_flops * mfu) / 3600, "memory_gib": memory,
          "advice": "" if memory <= FIT * dev.memory_gib else advice(config, dev, devices) or
          "the program needs more than the estimate: --config.train.remat=true, or --config.train.microbatches"}


def table(sweep: Sweep, description: SweepDescription, extra: dict[str, str], device_name: str, mfu: float,
          devices_per_job: int = 1, platform: str = "") -> str:
  """Per run and for the whole sweep: training FLOPs, hours on the device at `mfu`, and each training's peak
  memory per device, flagged with what to change where it would not fit. FLOPs and memory are inspect's
  formulas, or with `platform` each run's training step's program for that platform (program_costs)."""
  dev, n = device(device_name), description.trainings_per_run
  source = (f"FLOPs and memory from each training step's {platform} program (XLA:CPU's memory analysis)"
            if platform else "FLOPs and memory by inspect's formulas")
  lines = [f"cost on {device_name} ({dev.peak_flops / 1e12:.0f} TFLOP/s bf16 peak, {dev.memory_gib:g} GiB) at an "
           f"assumed MFU of {mfu:g}, {devices_per_job} device(s) per training, {n} trainings per run; {source}:",
           f"{'run':<18} {'FLOPs/training':>15} {'h/training':>11} {'h/run':>9} {'memory GiB':>11}  fits?"]
  total = 0.0
  for run, spec in zip(sweep.runs, description.runs):
    config = sweep.config(run, 0, description.lrs[0], extra)
    flops, memory = program_costs(config, platform, devices_per_job) if platform else (spec.flops_per_token, None)
    e = estimate(config, flops, dev, mfu, devices_per_job, memory)
    total += e["device_hours"] * n
    lines.append(f"{run.name:<18} {e['train_flops']:>15.3g} {e['device_hours'] / devices_per_job:>11.2f} "
                 f"{e['device_hours'] * n / devices_per_job:>9.1f} {e['memory_gib']:>11.1f}  "
                 + ("yes" if not e["advice"] else f"NO: {e['advice']}"))
  lines.append(f"whole sweep: {total:,.1f} {device_name}-hours ({total / 24:,.1f} days on one; widened grids add "
               "to it)")
  return "\n".join(lines)


WEIGHT_BYTES_PER_PARAM = 4  # a finished training's final weights: float32 (checkpoint.keep_optimizer=false)
STATE_BYTES_PER_PARAM = 12  # a checkpoint to resume from: float32 weights and Adam's two moments


def disk_line(sweep: Sweep, description: SweepDescription, extra: dict[str, str], jobs: int) -> str:
  """The disk the sweep's checkpoints take once every training has finished (each its final weights, or
  with checkpoint.keep_optimizer its newest checkpoint.keep whole checkpoints), and at most while `jobs`
  trainings run, each holding checkpoint.keep whole ones."""
  n, finished, running = description.trainings_per_run, 0, []
  for run, spec in zip(sweep.runs, description.runs):
    c = sweep.config(run, 0, description.lrs[0], extra).checkpoint
    whole = c.keep * STATE_BYTES_PER_PARAM * spec.total_params
    finished += n * (whole if c.keep_optimizer else WEIGHT_BYTES_PER_PARAM * spec.total_params)
    running.append(whole)
  in_flight = sum(sorted(running)[-jobs:])
  return (f"disk: {finished / 1e9:,.1f} GB of checkpoints when every training has finished ({n} trainings a run, "
          f"each keeping its final float32 weights, {WEIGHT_BYTES_PER_PARAM} bytes a parameter, unless "
          f"checkpoint.keep_optimizer), and up to {in_flight / 1e9:,.1f} GB more while trainings run (--jobs {jobs}: "
          f"checkpoint.keep whole checkpoints each, {STATE_BYTES_PER_PARAM} bytes a parameter with Adam's moments)")
