"""Orbax checkpoints: the train state (sharded arrays) and a JSON record (data iterator state, config)
per step; asynchronous saves, the last K kept, the newest readable one restored. Models without
optimizer state (conversions) are saved and every checkpoint folder is loaded for evaluation here too."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from gptoss_jax.fileio import atomic_folder
from gptoss_jax.model import WEIGHTS, fresh_rest

from gptoss_jax.train.step import TrainState


def _keys_to_data(state: TrainState) -> TrainState:
  """Typed PRNG keys (dropout streams) are stored as their raw uint32 data (arrays or abstract)."""
  def one(x):
    if not _is_key(x):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
    return jax.random.key_data(x)
  return jax.tree.map(one, state)


def _data_to_keys(state: TrainState, like: TrainState) -> TrainState:
  return jax.tree.map(lambda x, ref: jax.random.wrap_key_data(x) if _is_key(ref) else x, state, like)


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _as_uint32(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words (1- and 2-byte types widened, 8-byte types split)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)


@jax.jit
def fingerprint(tree) -> jax.Array:
  """Per leaf, two exact checksums of its bits (their sum, and their sum weighted by position, mod 2**32):
  integer sums do not depend on the order or sharding of the reduction, so a state restored onto another
  mesh has the same fingerprint, and one read back wrong does not. (A truncated array file can be read
  back by tensorstore without an error, as other values.)"""
  def one(x):
    bits = _as_uint32(x).reshape(-1)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) % 65521 + 1
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])
  return jnp.stack([one(x) for x in jax.tree.leaves(tree)])


class Checkpointer:

  def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: TrainState, record: dict) -> None:
    data = _keys_to_data(state)
    record = record | {"fingerprint": np.asarray(fingerprint(data)).tolist()}
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(data),
                                                    record=ocp.args.JsonSave(record)), force=True)

  def restore(self, abstract: TrainState, step: int | None = None, set_aside: bool = False
              ) -> tuple[TrainState, dict] | None:
    """The newest checkpoint (or `step`) that reads back. A damaged one is reported and skipped; with
    `set_aside` (a training run) it is also renamed <step>.damaged, so the run can save that step anew."""
    for s in ([step] if step is not None else reversed(self.steps())):
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_keys_to_data(abstract)), record=ocp.args.JsonRestore()))
        saved = restored["record"].get("fingerprint")
        if saved is not None and np.asarray(fingerprint(restored["state"])).tolist() != saved:
          raise ValueError("the arrays read back differ from those saved (fingerprint)")
        return _data_to_keys(restored["state"], abstract), restored["record"]
      except Exception as e:  # orbax and tensorstore raise many kinds for missing or corrupt files
        where = f"; moved to {self._set_aside(s).name}" if set_aside else ""
        print(f"warning: checkpoint {s} is damaged ({type(e).__name__}: {str(e)[:200]}){where}; "
              "trying the previous one", file=sys.stderr)
    return None

  def _set_aside(self, step: int) -> Path:
    folder = Path(self.manager.directory) / str(step)
    target = folder.with_name(f"{step}.damaged")
    n = 1
    while target.exists():
      target, n = folder.with_name(f"{step}.damaged-{n}"), n + 1
    folder.rename(target)
    self.manager.reload()
    return target

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ---------------------------------------------------------------- models for evaluation and generation


def save_model(dst: str | Path, config: ml_collections.ConfigDict, model, record: dict | None = None) -> Path:
  """A model without optimizer state (a conversion): DIR/config.json + DIR/checkpoints/0/weights.
  Written to a temporary folder beside DIR and renamed at the end: never half-written."""
  with atomic_folder(dst) as tmp:
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
    with ocp.CheckpointManager(tmp / "checkpoints", options=options) as manager:
      manager.save(0, args=ocp.args.Composite(weights=ocp.args.StandardSave(nnx.state(model, WEIGHTS)),
                                              record=ocp.args.JsonSave(record or {})))
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
  return Path(dst).absolute()


def load_model(directory: str | Path, step: int | None = None):
  """The newest checkpoint of a training run or a conversion (or the one at `step`) -> (run config,
  ModelConfig, model in eval mode)."""
  from gptoss_jax.config import ConfigError, ModelConfig
  from gptoss_jax.model import Transformer
  from gptoss_jax.sharding import make_mesh
  from gptoss_jax.train.step import Trainer
  directory = Path(directory)
  if not (directory / "config.json").is_file():
    raise ConfigError(f"{directory} is not a checkpoint folder (no config.json)")
  config = ml_collections.ConfigDict(json.loads((directory / "config.json").read_text()))
  cfg = ModelConfig.from_dict(config.model)
  checkpoints = Checkpointer(directory / "checkpoints", async_save=False)
  if not checkpoints.steps():
    raise ConfigError(f"{directory}/checkpoints holds no checkpoint")
  if step is not None and step not in checkpoints.steps():
    raise ConfigError(f"{directory}/checkpoints has no step {step} (steps: {', '.join(map(str, checkpoints.steps()))})")
  step = checkpoints.steps()[-1] if step is None else step
  if (directory / "checkpoints" / str(step) / "weights").is_dir():  # a conversion
    graphdef, weights, rest = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), WEIGHTS, ...)
    restored = checkpoints.manager.restore(step, args=ocp.args.Composite(weights=ocp.args.StandardRestore(weights)))
    model = nnx.merge(graphdef, restored["weights"], fresh_rest(rest))
  else:  # a training run
    trainer = Trainer(cfg, config.train, make_mesh({"data": 1}, jax.devices()[:1]))
    restored = checkpoints.restore(trainer.abstract_state(), step)
    if restored is None:
      raise ConfigError(f"{directory}/checkpoints: checkpoint {step} could not be read")
    state = restored[0]
    model = nnx.merge(trainer.graphdef, state.params, state.rest)
  model.eval()
  return config, cfg, model
