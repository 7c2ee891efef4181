"""The one projection every layer uses."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp

from gptoss_jax.model import cpu_kernels

FEW_ROWS = cpu_kernels.MAX_ROWS  # up to this many rows a projection reads its weight as stored (decoding)


def project(x: jax.Array, w: jax.Array, n_in: int = 1, *, platform: str) -> jax.Array:
  """Contracts the last `n_in` axes of x with the first `n_in` axes of w: [..., *in] x [*in, *out] -> [..., *out].

  Computed as a 2-D matmul against the weight transposed to [out, in] (PyTorch's layout): XLA:CPU's
  backward pass then needs no transposed copies of activations, which made a GPT-2 MLP's forward and
  backward 2.2x faster than the equivalent einsum on CPU (benchmarks/README figures). For a few rows
  (decoding) the weight is read as stored instead: XLA:CPU would copy a transposed weight on every call;
  a bfloat16 one on CPU by `cpu_kernels.bf16_matvec`, which does not copy it to float32 first either.
  `platform` (cpu | gpu | tpu, `gptoss_jax.model.platform.target`) is the one whose program is built.
  """
  lead, ins, outs = x.shape[:x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
  x2 = x.reshape(-1, math.prod(ins))
  w2 = w.reshape(math.prod(ins), math.prod(outs))
  if reads_in_place(x2.shape[0], w2, platform):
    return cpu_kernels.bf16_matvec(x2, w2).astype(x.dtype).reshape(*lead, *outs)
  w2 = w2.astype(x.dtype)
  if x2.shape[0] <= FEW_ROWS:
    # XLA:CPU's bf16 matrix-vector product is slower than converting both to float32 (1.05-1.4x,
    # measured side by side); it sums in float32 too
    dt = jnp.float32 if x.dtype == jnp.bfloat16 and platform == "cpu" else x.dtype
    y = jax.lax.dot_general(x2.astype(dt), w2.astype(dt), (((1,), (0,)), ((), ()))).astype(x.dtype)
  else:
    y = jax.lax.dot_general(x2, w2.T, (((1,), (1,)), ((), ())))
  return y.reshape(*lead, *outs)


def project_each(x: jax.Array, ws: tuple[jax.Array, ...], *, platform: str) -> tuple[jax.Array, ...]:
  """`project(x, w)` for each w (one input axis): in one call of the CPU kernel where it takes them all
  (decoding's q, k and v, each weight read as stored), else one projection each."""
  x2 = x.reshape(-1, x.shape[-1])
  if all(reads_in_place(x2.shape[0], w.reshape(w.shape[0], -1), platform) for w in ws):
    ys = cpu_kernels.bf16_matvecs(x2, [w.reshape(w.shape[0], -1) for w in ws])
    return tuple(y.astype(x.dtype).reshape(*x.shape[:-1], *w.shape[1:]) for y, w in zip(ys, ws))
  return tuple(project(x, w, platform=platform) for w in ws)


def reads_in_place(n_rows: int, w: jax.Array, platform: str) -> bool:
  """Whether a product of n_rows rows with w runs in the CPU kernel (a bfloat16 weight, a few rows, on
  CPU): it reads the weight once as stored, where XLA:CPU would write and read a float32 copy of it."""
  return n_rows <= FEW_ROWS and w.dtype == jnp.bfloat16 and platform == "cpu" and cpu_kernels.available()


def project_batched(x_ExCxI: jax.Array, w_ExIxO: jax.Array) -> jax.Array:
  """Per-group projection [E, C, in] x [E, in, *out] -> [E, C, *out], in the same [out, in] form."""
  E, I = w_ExIxO.shape[:2]
  outs = w_ExIxO.shape[2:]
  w = jnp.swapaxes(w_ExIxO.reshape(E, I, math.prod(outs)), 1, 2).astype(x_ExCxI.dtype)
  y = jax.lax.dot_general(x_ExCxI, w, (((2,), (2,)), ((0,), (0,))))
  return y.reshape(*x_ExCxI.shape[:2], *outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def split(x: jax.Array, sizes: tuple[int, ...], axis: int) -> tuple[jax.Array, ...]:
  """Consecutive pieces of x along `axis` (a fused q/k/v projection into q, k and v). The gradient is one
  concatenation, not a zero-padded copy of x per piece summed (what slicing's transpose gives)."""
  bounds = itertools.accumulate(sizes, initial=0)
  return tuple(jax.lax.slice_in_dim(x, lo, lo + n, axis=axis) for lo, n in zip(bounds, sizes))


def _split_fwd(x, sizes, axis):
  return split(x, sizes, axis), None


def _split_bwd(sizes, axis, _, grads):
  return (jnp.concatenate(grads, axis=axis),)


split.defvjp(_split_fwd, _split_bwd)
