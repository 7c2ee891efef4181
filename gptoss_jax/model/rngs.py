"""The random streams a model is built from: nnx's own keys, without nnx's cost when building is traced."""

from __future__ import annotations

import jax
from flax import nnx


class Stream(nnx.RngStream):
  """nnx.RngStream drawing the same keys (fold_in(key, count), then count + 1), its count replaced whole.

  nnx writes the count in place (`count[...] += 1`), and an in-place write compares the old and new values'
  shardings; on a tracer that lookup raises an AttributeError whose message walks the whole trace so far.
  Every key drawn while a model is built under `jit` or `eval_shape` then costs time growing with the model
  built so far: sizing the gpu-scale sweeps' models took 133 s, 18 s with this stream.
  """

  def __call__(self) -> jax.Array:
    self.count._check_can_update()
    key = jax.random.fold_in(self.key[...], self.count[...])
    self.count.set_value(self.count.get_value() + 1)
    return key


def rngs(params: int = 0, dropout: int | None = None) -> nnx.Rngs:
  """nnx.Rngs(params=..., dropout=...) (`nnx.Rngs(params)` when dropout is None) drawing from `Stream`s: the
  same keys."""
  seeds = {"default": params} if dropout is None else {"params": params, "dropout": dropout}
  out = nnx.Rngs(**seeds)
  for tag, seed in seeds.items():  # nnx.Rngs makes its own RngStream of a stream it is given
    setattr(out, tag, Stream(seed, tag=tag))
  return out
