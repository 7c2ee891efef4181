"""Training checkpoints (orbax): the train state (sharded arrays) and a JSON record (data iterator state,
the state's fingerprint) per step; asynchronous saves, the last K kept, the newest readable one
restored. A finished training may keep its final weights alone (item `weights`, as a conversion writes
them: no optimizer state) in place of all of them. Built on gptoss_jax.weights, which reads the model back
from either without any of this."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gptoss_jax.weights import data_to_keys, keys_to_data, steps

from gptoss_jax.train.step import TrainState


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


def fingerprint(tree) -> np.ndarray:
  """Per leaf, two exact checksums of its bits (their sum, and their sum weighted by position, mod 2**32):
  integer sums do not depend on the order or sharding of the reduction, so a state restored onto another
  mesh has the same fingerprint, and one read back wrong does not. (A truncated array file can be read
  back by tensorstore without an error, as other values.) One leaf at a time, each where it lies: the gpu
  scale's state on 8 fake devices flattened eagerly, or summed in one program, took 7-20 GB of host memory."""
  return np.stack([np.asarray(_leaf_fingerprint(x)) for x in jax.tree.leaves(tree)])  # each waited for


@jax.jit
def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  bits = _as_uint32(x)
  # each element's position in the flattened array (mod 2**32), from its indices: flattening a sharded array
  # would gather it whole onto every device
  position, stride = jnp.zeros(bits.shape, jnp.uint32), 1
  for axis in reversed(range(bits.ndim)):
    position = position + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= bits.shape[axis]
  weights = position % 65521 + 1
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


def final_weights_step(workdir: Path) -> int | None:
  """The step of a finished training's weights-only checkpoint in workdir/checkpoints, if that is the newest."""
  available = steps(workdir)
  return available[-1] if available and (workdir / "checkpoints" / str(available[-1]) / "weights").is_dir() else None


class Checkpointer:

  def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: TrainState, record: dict) -> None:
    data = keys_to_data(state)
    record = record | {"fingerprint": np.asarray(fingerprint(data)).tolist()}
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(data),
                                                    record=ocp.args.JsonSave(record)), force=True)

  def save_final_weights(self, step: int, weights, record: dict) -> None:
    """The finished training's weights alone (a third of a checkpoint with Adam's moments) as step `step`,
    then, once they are on disk, every other checkpoint deleted: a crash in between leaves both."""
    record = record | {"fingerprint": np.asarray(fingerprint(weights)).tolist()}
    self.manager.save(step, args=ocp.args.Composite(weights=ocp.args.StandardSave(weights),
                                                    record=ocp.args.JsonSave(record)), force=True)
    self.manager.wait_until_finished()
    for s in self.steps():
      if s != step:
        self.manager.delete(s)

  def restore(self, abstract: TrainState, step: int | None = None, set_aside: bool = False
              ) -> tuple[TrainState, dict] | None:
    """The newest checkpoint (or `step`) that reads back. A damaged one is reported and skipped; with
    `set_aside` (a training run) it is also renamed <step>.damaged, so the run can save that step anew."""
    for s in ([step] if step is not None else reversed(self.steps())):
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(keys_to_data(abstract)), record=ocp.args.JsonRestore()))
        saved = restored["record"].get("fingerprint")
        if saved is not None and np.asarray(fingerprint(restored["state"])).tolist() != saved:
          raise ValueError("the arrays read back differ from those saved (fingerprint)")
        return data_to_keys(restored["state"], abstract), restored["record"]
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
