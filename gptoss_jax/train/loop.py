"""The training loop: validate, prepare data, build or resume the state, step, evaluate, log, save."""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np

from gptoss_jax import runtime
from gptoss_jax.config import ConfigError, DataConfig, DistributedConfig, ModelConfig, RunConfig
from gptoss_jax.data.pipeline import eval_batches, train_dataset
from gptoss_jax.data.prepare import dataset_dir, ensure_dataset, load_meta
from gptoss_jax.fileio import atomic_write
from gptoss_jax.inspect import stats
from gptoss_jax.sharding import batch_divisor, make_mesh
from gptoss_jax.train.checkpoint import Checkpointer, final_weights_step
from gptoss_jax.train.metrics import (MetricsLogger, peak_flops_per_device, peak_memory_bytes, plot_losses,
                                     router_health, run_names)
from gptoss_jax.train.step import Trainer
from gptoss_jax.train.workdir import RunLock, refuse_changed_config, write_config


class TrainingError(RuntimeError):
  """The run cannot go on (a non-finite loss); the message says which checkpoint is the last good one."""


def init_distributed(d: DistributedConfig) -> None:
  """Several hosts: every process runs the same command with its own process_id; "auto" lets JAX find
  the cluster itself (TPU pods, SLURM, Kubernetes)."""
  if not d.coordinator or jax.distributed.is_initialized():
    return
  if d.coordinator == "auto":
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(d.coordinator, num_processes=d.num_processes, process_id=d.process_id)


def validate(config: RunConfig) -> tuple[ModelConfig, int]:
  """What the typed config could not check alone: the mesh against the devices and the batch against the
  mesh and the processes. Returns the model config and the local batch size."""
  init_distributed(config.distributed)  # before anything asks JAX for devices
  t, mesh = config.train, make_mesh(config.mesh)
  divisor = batch_divisor(mesh) * t.microbatches
  if t.batch_size % divisor:
    raise ConfigError(f"train.batch_size {t.batch_size} does not divide into {t.microbatches} microbatch(es) "
                      f"over the data x fsdp x expert mesh axes ({batch_divisor(mesh)} shards)")
  if t.batch_size % jax.process_count():
    raise ConfigError(f"train.batch_size {t.batch_size} does not divide over {jax.process_count()} processes")
  return config.model, t.batch_size // jax.process_count()


def ensure_dataset_on_hosts(d: DataConfig, progress: bool) -> Path:
  """The prepared dataset, made by the first process while every other one waits."""
  if jax.process_index() == 0:
    ensure_dataset(d, progress)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("dataset prepared")
  return dataset_dir(d)


class StopRequest:
  """SIGTERM or Ctrl-C asks the loop to save and exit at the end of the current step."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
      raise KeyboardInterrupt
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train(config: RunConfig, workdir: str | Path) -> dict:
  """Trains (resuming from the newest checkpoint in workdir); returns the last logged metrics."""
  began = time.perf_counter()
  cfg, local_batch = validate(config)
  workdir = Path(workdir)
  is_main = jax.process_index() == 0
  with RunLock(workdir, enabled=is_main):
    refuse_changed_config(workdir, config)
    if already_finished(workdir, config.train.steps):
      return {}
    data = prepared_data(config, cfg, progress=config.log.progress and is_main)
    if is_main:
      write_config(workdir, config)
    trainer = Trainer(cfg, config.train, make_mesh(config.mesh))
    checkpoints = Checkpointer(workdir / "checkpoints", config.checkpoint.keep, config.checkpoint.async_save)
    batches = iter(train_dataset(data, config.data.seq_len, local_batch, config.train.seed, jax.process_index(),
                                 jax.process_count()))
    state, elapsed_before = resume(trainer, checkpoints, batches, workdir, is_main)
    logger = MetricsLogger(workdir, enabled=is_main, resume_step=int(state.step))
    logger.hparams(*run_hparams(config, cfg, workdir))
    held_out = {split: [trainer.global_batch(b) for b in eval_batches(
        data, config.data.seq_len, local_batch, config.train.eval_batches, jax.process_index(), jax.process_count(),
        split)] for split in ("val", "test")}
    for split, read in held_out.items():
      if is_main and len(read) < config.train.eval_batches:
        print(f"note: the {split} split fills {len(read)} batches of {config.train.batch_size} windows, fewer than "
              f"train.eval_batches = {config.train.eval_batches}: each evaluation reads those (no window twice)",
              file=sys.stderr)
    try:
      loop = Loop(config, cfg, trainer, checkpoints, logger, held_out, workdir, began - (elapsed_before or 0.0))
      last = loop.run(state, batches, resumed=elapsed_before is not None)
    finally:
      checkpoints.close()
      logger.close()
  if is_main:
    plot_losses(workdir)
  return last


def already_finished(workdir: Path, steps: int) -> bool:
  """A training that finished keeping its final weights alone: nothing to do up to its last step, and no
  optimizer state to train on with."""
  final = final_weights_step(workdir)
  if final is None:
    return False
  if steps > final:
    raise ConfigError(f"{workdir} finished at step {final} and kept its final weights only, not the optimizer state "
                      f"that training on to step {steps} needs: train anew in another --workdir (with "
                      "--config.checkpoint.keep_optimizer=true to keep that state)")
  if jax.process_index() == 0:
    print(f"{workdir} finished at step {final}; its weights are in {workdir / 'checkpoints' / str(final)}",
          file=sys.stderr)
  return True


def prepared_data(config: RunConfig, cfg: ModelConfig, progress: bool) -> Path:
  data = ensure_dataset_on_hosts(config.data, progress)
  meta = load_meta(data)
  if meta["vocab_size"] > cfg.vocab_size:
    raise ConfigError(f"model.vocab_size {cfg.vocab_size} is smaller than the {meta['tokenizer']} "
                      f"tokenizer's {meta['vocab_size']}")
  return data


def resume(trainer: Trainer, checkpoints: Checkpointer, batches, workdir: Path, is_main: bool):
  """The newest readable checkpoint's state (the data iterator set to where it was) and the wall time of
  the earlier invocations (None for a fresh start); damaged checkpoints are set aside."""
  restored = checkpoints.restore(trainer.abstract_state(), set_aside=is_main)
  if not restored:
    return trainer.init_state(), None
  state, record = restored
  batches.set_state(record["data"])
  if is_main:
    print(f"resumed from step {int(state.step)} in {workdir / 'checkpoints'}", file=sys.stderr)
  return state, record.get("elapsed_s", 0.0)


class Loop:
  """The step loop: train, log, evaluate, check, save; SIGTERM / Ctrl-C save and stop. Evaluations during
  training use the `val` split; the last step also evaluates the `test` split, once (what a comparison of
  trainings reports: never seen by any choice made from the `val` losses)."""

  def __init__(self, config, cfg, trainer, checkpoints, logger, held_out, workdir, began):
    self.config, self.t, self.trainer, self.checkpoints = config, config.train, trainer, checkpoints
    self.logger, self.held_out, self.workdir, self.began = logger, held_out, workdir, began
    self.flops_per_token = stats(cfg, config.data.seq_len).train_flops_per_token
    self.peak, source = peak_flops_per_device(config.log.peak_flops)
    self.tokens_per_step = config.train.batch_size * config.data.seq_len
    self.is_main = jax.process_index() == 0
    if self.is_main:
      print(f"MFU is relative to {self.peak / 1e12:.3g} TFLOP/s per device ({source}) x {jax.device_count()} "
            "devices", file=sys.stderr)

  def run(self, state, batches, resumed: bool) -> dict:
    t, every = self.t, self.config.checkpoint.every
    start, end = int(state.step), min(t.stop_at or t.steps, t.steps)
    bar = _progress_bar(self.config.log.progress and self.is_main, start, t.steps)
    last, self.last_saved = {}, start if resumed else None
    self.clock, self.clock_step = time.perf_counter(), start
    with StopRequest() as stop:
      for step in range(start, end):
        state, metrics = self.trainer.train_step(state, self.trainer.global_batch(next(batches)))
        done = step + 1
        stopping = stop.requested  # read once: a signal landing later in this step waits for the next one
        final = done == end or stopping
        save = done % every == 0 or final
        if done % self.config.log.every == 0 or save:
          last = self.log(done, jax.device_get(metrics))
          if bar:
            bar.update(done - bar.n)
            bar.set_postfix(loss=f"{last['train/loss']:.3f}", tok_s=f"{last['perf/tokens_per_s']:,.0f}")
        if done % t.eval_every == 0 or save:  # every checkpoint is evaluated before it is written
          last |= self.evaluate(done, state)
        if done == t.steps:
          last |= self.evaluate(done, state, "test")
        if save:
          self.check_finite("held-out loss", last["eval/loss"], done)
          # on CPU the save copies the state within host memory: first hand back the steps' freed temporaries,
          # which runtime.reuse_step_memory keeps (8 fake devices' of the gpu scale's e16_k2: 7 GB)
          runtime.release_free_memory()
          self.save(done, state, {"data": batches.get_state(), "step": done,
                                  "elapsed_s": time.perf_counter() - self.began})
        if stopping:
          if self.is_main:
            print(f"\nstopped by signal at step {done}; checkpoint saved", file=sys.stderr)
          break
    if bar:
      bar.close()
    return last

  def save(self, step: int, state, record: dict) -> None:
    """A checkpoint to resume from; the last step's, unless checkpoint.keep_optimizer, the weights alone in
    place of every checkpoint."""
    if step == self.t.steps and not self.config.checkpoint.keep_optimizer:
      self.checkpoints.save_final_weights(step, self.trainer.weights(state), record)
    else:
      self.checkpoints.save(step, state, record)
    self.last_saved = step

  def check_finite(self, what: str, value: float, step: int) -> None:
    """A loss (training, or held-out before a save) that is not finite stops the run, naming the last
    checkpoint written: a checkpoint is written only after its held-out loss came out finite."""
    if not math.isfinite(value):
      self.checkpoints.wait()
      good = f"step {self.last_saved}" if self.last_saved is not None else "none"
      raise TrainingError(f"{what} is {value} at step {step}; stopping (last good checkpoint: {good} in "
                          f"{self.workdir / 'checkpoints'})")

  def log(self, step: int, metrics: dict) -> dict:
    self.check_finite("loss", float(metrics["loss"]), step)
    now = time.perf_counter()
    tokens_per_s = self.tokens_per_step * (step - self.clock_step) / (now - self.clock)
    self.clock, self.clock_step = now, step
    return _log(self.logger, step, metrics, tokens_per_s, self.tokens_per_step, self.flops_per_token, self.peak,
                now - self.began)

  def evaluate(self, step: int, state, split: str = "val") -> dict:
    """Logs the mean loss over the split's held-out batches as `eval/loss` (val) or `test/loss`, with its
    standard error over batches (the estimate's own noise; no window is in two batches); the test split's
    per-batch losses and its number of windows also go to DIR/heldout.json, so comparisons can measure that
    noise in their paired differences."""
    per_batch = np.array([self.trainer.eval_step(state.params, state.rest, b) for b in self.held_out[split]])
    se = float(np.std(per_batch, ddof=1) / np.sqrt(len(per_batch))) if len(per_batch) > 1 else float("nan")
    prefix = "eval" if split == "val" else split
    scalars = {f"{prefix}/loss": float(np.mean(per_batch)), f"{prefix}/loss_se": se}
    self.logger.write(step, scalars)
    if split == "test" and self.is_main:
      atomic_write(self.workdir / "heldout.json", json.dumps(
          {"split": split, "step": step, "windows": len(per_batch) * self.t.batch_size,
           "batch_losses": [float(x) for x in per_batch]}))
    return scalars


def _log(logger: MetricsLogger, step: int, metrics: dict, tokens_per_s: float, tokens_per_step: int,
         flops_per_token: float, peak: float, elapsed_s: float) -> dict:
  scalars = {f"train/{k}": float(v) for k, v in metrics.items() if k != "expert_load"}
  scalars |= {"perf/tokens_per_s": tokens_per_s, "perf/step_time_s": tokens_per_step / tokens_per_s,
              "perf/mfu": tokens_per_s * flops_per_token / (peak * jax.device_count()),
              "perf/peak_memory_gib": peak_memory_bytes() / 2**30, "perf/elapsed_s": elapsed_s,
              "train/tokens": step * tokens_per_step}
  histograms = {}
  if "expert_load" in metrics:  # [layers, experts], fractions of the routed assignments
    load = np.asarray(metrics["expert_load"])
    scalars |= router_health(load)
    histograms = {f"moe/expert_load/layer{layer:02d}": row for layer, row in enumerate(load)}
  logger.write(step, scalars, histograms)
  return scalars


def run_hparams(config, cfg: ModelConfig, workdir: Path) -> tuple[dict, str]:
  """What a comparison of runs needs in TensorBoard's HParams table: the run's name, seed, learning rate
  and budget, its parameter counts and FLOPs per token, and the model's switches (the fields that decide
  what it computes); and the session group (a sweep run's seeds share one)."""
  name, group = run_names(workdir.absolute())
  s = stats(cfg, config.data.seq_len)
  hparams = {"run": name, "seed": config.train.seed, "lr": config.train.lr, "steps": config.train.steps,
             "tokens": config.train.steps * config.train.batch_size * config.data.seq_len,
             "total_params": s.total_params, "active_params": s.active_params,
             "train_flops_per_token": s.train_flops_per_token, "tokenizer": config.data.tokenizer}
  return hparams | {f"model.{k}": v for k, v in cfg.computation().items()}, group


def _progress_bar(enabled: bool, start: int, total: int):
  if not enabled:
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
