"""What a sweep will cost before it runs: accelerator-hours on a named device at an assumed MFU, and each
training's peak memory (gptoss_jax.inspect's estimate) against the device's, with what to change when it
does not fit. `python -m experiments.run <sweep> --scale S --dry-run --device h100 [--mfu 0.3]`."""

from __future__ import annotations

import dataclasses

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


def memory_gib(config: RunConfig, devices: int = 1, microbatches: int = 0, remat: bool | None = None) -> float:
  """One device's estimated peak in a training of `config` spread over `devices` (data parallel; fsdp
  shards the state when the mesh asks for it)."""
  t, mesh = config.train, config.mesh
  microbatches = microbatches or t.microbatches
  tokens = t.batch_size * config.data.seq_len // (devices * microbatches)
  shards = devices if mesh.fsdp == -1 else mesh.fsdp
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


def estimate(config: RunConfig, flops_per_token: float, dev: Device, mfu: float, devices: int = 1) -> dict:
  """One training's FLOPs, device-hours at `mfu`, peak memory per device and fit."""
  tokens = config.train.batch_size * config.data.seq_len * config.train.steps
  flops = flops_per_token * tokens
  return {"train_flops": flops, "device_hours": flops / (dev.peak_flops * mfu) / 3600,
          "memory_gib": memory_gib(config, devices), "advice": advice(config, dev, devices)}
