"""Orbax checkpoints: the train state (sharded arrays) and a JSON record (data iterator state, config)
per step; asynchronous saves, the last K kept, the newest readable one restored."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

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


class Checkpointer:

  def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: TrainState, record: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_keys_to_data(state)),
                                                    record=ocp.args.JsonSave(record)), force=True)

  def restore(self, abstract: TrainState, step: int | None = None) -> tuple[TrainState, dict] | None:
    """The newest checkpoint (or `step`) that reads back; a damaged one is reported and skipped."""
    for s in ([step] if step is not None else reversed(self.steps())):
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_keys_to_data(abstract)), record=ocp.args.JsonRestore()))
        return _data_to_keys(restored["state"], abstract), restored["record"]
      except Exception as e:  # orbax and tensorstore raise many kinds for missing or corrupt files
        print(f"warning: checkpoint {s} is damaged ({type(e).__name__}: {str(e)[:200]}); "
              "trying the previous one", file=sys.stderr)
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
