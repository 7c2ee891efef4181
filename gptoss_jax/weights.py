"""Model weights on disk (orbax), with no optimizer and no Trainer: what a conversion writes, and what
evaluation and generation read, from a conversion or from a training run's checkpoints.

A folder holds `config.json` (the run config) and `checkpoints/<step>/`: a conversion's step holds the
item `weights` (the model's weights, model.WEIGHTS); a training run's holds `state` (the train state,
of which only the parameters and the rest of the model state are read here) and `record`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from gptoss_jax.config import ConfigError, RunConfig
from gptoss_jax.fileio import atomic_folder
from gptoss_jax.model import WEIGHTS, Transformer, fresh_rest


def is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def keys_to_data(tree):
  """Typed PRNG keys (dropout streams) are stored as their raw uint32 data (arrays or abstract)."""
  def one(x):
    if not is_key(x):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
    return jax.random.key_data(x)
  return jax.tree.map(one, tree)


def data_to_keys(tree, like):
  return jax.tree.map(lambda x, ref: jax.random.wrap_key_data(x) if is_key(ref) else x, tree, like)


def save_model(dst: str | Path, config: RunConfig, model, record: dict | None = None) -> Path:
  """A model without optimizer state (a conversion): DIR/config.json + DIR/checkpoints/0/weights.
  Written to a temporary folder beside DIR and renamed at the end: never half-written."""
  with atomic_folder(dst) as tmp:
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
    with ocp.CheckpointManager(tmp / "checkpoints", options=options) as manager:
      manager.save(0, args=ocp.args.Composite(weights=ocp.args.StandardSave(nnx.state(model, WEIGHTS)),
                                              record=ocp.args.JsonSave(record or {})))
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
  return Path(dst).absolute()


def steps(directory: Path) -> list[int]:
  folder = directory / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def load_model(directory: str | Path, step: int | None = None):
  """The newest checkpoint of a training run or a conversion (or the one at `step`) -> (run config,
  ModelConfig, model in eval mode), on one device."""
  directory = Path(directory).absolute()
  if not (directory / "config.json").is_file():
    raise ConfigError(f"{directory} is not a checkpoint folder (no config.json)")
  config = RunConfig.from_dict(json.loads((directory / "config.json").read_text()))
  cfg = config.model
  available = steps(directory)
  if not available:
    raise ConfigError(f"{directory}/checkpoints holds no checkpoint")
  if step is not None and step not in available:
    raise ConfigError(f"{directory}/checkpoints has no step {step} (steps: {', '.join(map(str, available))})")
  step = available[-1] if step is None else step
  graphdef, weights, rest = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), WEIGHTS, ...)
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restore_args = lambda tree: jax.tree.map(lambda x: ocp.ArrayRestoreArgs(dtype=x.dtype, sharding=one_device), tree)
  manager = ocp.CheckpointManager(directory / "checkpoints", options=ocp.CheckpointManagerOptions(create=False))
  try:
    if (directory / "checkpoints" / str(step) / "weights").is_dir():  # a conversion
      restored = manager.restore(step, args=ocp.args.Composite(weights=ocp.args.PyTreeRestore(
          item=weights, restore_args=restore_args(weights))))
      model = nnx.merge(graphdef, restored["weights"], fresh_rest(rest))
    else:  # a training run: its parameters and model state, not the optimizer's
      _, params, others = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param, ...)
      item = {"params": params, "rest": keys_to_data(others)}
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args(item), partial_restore=True)))["state"]
      model = nnx.merge(graphdef, restored["params"], data_to_keys(restored["rest"], others))
  except Exception as e:  # orbax and tensorstore raise many kinds for missing or corrupt files
    raise ConfigError(f"{directory}/checkpoints/{step} could not be read ({type(e).__name__}: {str(e)[:200]})") from None
  finally:
    manager.close()
  model.eval()
  return config, cfg, model
