"""How expert-sorted rows go through the experts, one function per algorithm (gptoss_jax.model.moe chooses):
the rows layout (each expert's assignments padded to a multiple of a block, a static bound on the rows), the
dropless loop over experts (the CPU's grouped GEMM), the blocked batched matmuls (GPU and TPU), capacity
buckets, ragged_dot and the dense reference. Each takes the experts' weights as stored and a `take` that
gives some experts' in the compute dtype (gptoss_jax.model.moe.expert_params)."""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gptoss_jax.config import ModelConfig

ExpertFn = Callable[[jax.Array], jax.Array]  # [E, C, D] -> [E, C, D]
RowsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # rows [R, D], start_E, count_E -> [R, D]
# (stored expert weights, experts [C] or a slice) -> w_in [C, D, G*F], b_in [C, G*F], w_out [C, F, D], b_out [C, D]
Take = Callable[[tuple, jax.Array | slice], tuple]


def sort_by_expert(idx_NxK: jax.Array, n_experts: int):
  """The (token, expert) assignments sorted by expert: the order [A], each one's expert [A], the count
  per expert [E], and each one's rank within its expert [A]."""
  e_A = idx_NxK.reshape(-1)
  order_A = jnp.argsort(e_A, stable=True)
  e_sorted_A = e_A[order_A]
  counts_E = jnp.bincount(e_A, length=n_experts)
  rank_A = jnp.arange(e_A.size) - (jnp.cumsum(counts_E) - counts_E)[e_sorted_A]
  return order_A, e_sorted_A, counts_E, rank_A


def through_rows(x_NxD, w_NxK, order_A, row_A, n_rows: int, rows_fn: Callable[[jax.Array], jax.Array]):
  """Assignment order_A[i] placed at row row_A[i] of an [n_rows, D] buffer (row n_rows: dropped, output
  0; empty rows hold zeros), rows_fn run over the buffer, each token's outputs mixed by its routing weights."""
  N, K = w_NxK.shape
  row_token = jnp.full((n_rows + 1,), N, jnp.int32).at[row_A].set(order_A // K)[:n_rows]
  y_rows = rows_fn(jnp.concatenate([x_NxD, jnp.zeros_like(x_NxD[:1])])[row_token])
  row_of_assignment = jnp.zeros_like(row_A).at[order_A].set(row_A)
  y_NxKxD = y_rows.at[row_of_assignment].get(mode="fill", fill_value=0).reshape(N, K, -1)
  return jnp.einsum("nkd,nk->nd", y_NxKxD, w_NxK.astype(y_NxKxD.dtype))


def capacity_dispatch(x_NxD, idx_NxK, w_NxK, n_experts: int, capacity: int, expert_fn: ExpertFn):
  """Each expert's first `capacity` assignments (in token order) in a bucket of its own, the rest dropped."""
  E, C, D = n_experts, capacity, x_NxD.shape[-1]
  order_A, e_sorted_A, _, rank_A = sort_by_expert(idx_NxK, E)
  slot_A = jnp.where(rank_A < C, e_sorted_A * C + rank_A, E * C)  # E * C: dropped
  return through_rows(x_NxD, w_NxK, order_A, slot_A, E * C,
                      lambda rows: expert_fn(rows.reshape(E, C, D)).reshape(E * C, D))


def padded_rows(assignments: int, n_experts: int, align: int) -> int:
  """The most rows the assignments take with each expert's padded to a multiple of `align`: at most
  align - 1 rows of padding per expert, and a multiple of `align`."""
  return (assignments + n_experts * (align - 1)) // align * align


def block_sparse_dispatch(x_NxD, idx_NxK, w_NxK, n_experts: int, align: int, expert_fn: RowsFn):
  """Dropless: the assignments sorted by expert into rows, each expert's padded to a multiple of `align`,
  expert e owning rows [start_E[e], start_E[e] + count_E[e]). The row count is bounded statically
  (padded_rows), so no token is ever dropped."""
  A, E = idx_NxK.size, n_experts
  order_A, e_sorted_A, counts_E, rank_A = sort_by_expert(idx_NxK, E)
  padded_E = -(-counts_E // align) * align
  start_E = jnp.cumsum(padded_E) - padded_E
  n_rows = padded_rows(A, E, align)
  return through_rows(x_NxD, w_NxK, order_A, start_E[e_sorted_A] + rank_A, n_rows,
                      lambda rows: expert_fn(rows, start_E, padded_E))


def _each_expert(blocks: tuple[int, ...], unpack: Callable, weights, start_E, count_E, body, carry):
  """body(e, row, size, expert e's weights, carry) over every block of every expert's rows, the carry
  threaded through; experts without rows are skipped, their weights never unpacked."""
  def expert(e, carry):
    w = unpack(weights, e)
    start, left = start_E[e], count_E[e]
    for size in blocks:
      n = left // size
      carry = jax.lax.fori_loop(0, n, lambda j, c: body(e, start + j * size, size, w, c), carry)
      start, left = start + n * size, left - n * size
    return carry
  skip = lambda e, carry: carry
  return jax.lax.fori_loop(0, start_E.shape[0], lambda e, c: jax.lax.cond(count_E[e] > 0, expert, skip, e, c),
                           carry)


def ffn_backward(activation: Callable, w: tuple, x, h, dy) -> tuple[jax.Array, tuple]:
  """The expert FFN's backward over rows x [.., R, D] (one expert's, or a batch of blocks' each with its own
  weights [.., D, G*F], ...): dx, and the weights' gradients in float32 summed over the rows."""
  w_in, _, w_out, _ = w
  a, activation_vjp = jax.vjp(activation, h)
  dh = activation_vjp(jnp.einsum("...rd,...fd->...rf", dy, w_out))[0]
  dx = jnp.einsum("...rf,...df->...rd", dh, w_in)
  f32 = jnp.float32
  return dx, (jnp.einsum("...rd,...rf->...df", x, dh, preferred_element_type=f32), jnp.sum(dh, -2, f32),
              jnp.einsum("...rf,...rd->...fd", a, dy, preferred_element_type=f32), jnp.sum(dy, -2, f32))


def trained(weights: tuple) -> bool:
  """Whether expert weights get gradients: packed MXFP4 ones (integers) are frozen."""
  return all(jnp.issubdtype(w.dtype, jnp.floating) for w in weights)


def expert_loop(activation: Callable[[jax.Array], jax.Array], blocks: tuple[int, ...], take: Take) -> RowsFn:
  """The experts' FFN over expert-sorted rows as a loop: for each expert, its weights taken once, then its
  rows in blocks of blocks[0] rows and the remainder in the smaller sizes (descending, each dividing the
  one before), so compute follows the real assignments (no weight copy per block; a grouped GEMM for
  CPUs). The backward pass is the same loop, accumulating each expert's weight gradients in float32.
  Weights that are not floating point (packed MXFP4) are frozen: only the input gets a gradient."""

  def unpack(weights, e):  # expert e's weights, unpacked once per expert
    return tuple(w[0] for w in take(weights, e[None]))

  def rows(x_RxD, start, size):
    return jax.lax.dynamic_slice_in_dim(x_RxD, start, size)

  each_expert = functools.partial(_each_expert, blocks, unpack)

  def forward(x_RxD, start_E, count_E, weights, keep_h: bool):
    """y [R, D], and with keep_h the pre-activations [R, G*F] for the backward pass."""
    def body(e, i, size, w, carry):
      w_in, b_in, w_out, b_out = w
      h = rows(x_RxD, i, size) @ w_in + b_in
      y = activation(h) @ w_out + b_out
      update = lambda big, small: jax.lax.dynamic_update_slice_in_dim(big, small, i, 0)
      return tuple(update(big, small) for big, small in zip(carry, (y, h)))
    R, GF = x_RxD.shape[0], jax.eval_shape(unpack, weights, 0)[0].shape[1]
    zeros = (jnp.zeros_like(x_RxD),) + ((jnp.zeros((R, GF), x_RxD.dtype),) if keep_h else ())
    return each_expert(weights, start_E, count_E, body, zeros)

  @jax.custom_vjp
  def run(x_RxD, start_E, count_E, weights):
    return forward(x_RxD, start_E, count_E, weights, keep_h=False)[0]

  def run_fwd(x_RxD, start_E, count_E, weights):
    y_RxD, h_RxGF = forward(x_RxD, start_E, count_E, weights, keep_h=True)
    return y_RxD, (x_RxD, start_E, count_E, weights, h_RxGF)

  def run_bwd(res, dy_RxD):
    x_RxD, start_E, count_E, weights, h_RxGF = res
    train = trained(weights)

    def body(e, i, size, w, carry):
      dx_RxD, dweights = carry
      dx, grads = ffn_backward(activation, w, rows(x_RxD, i, size), rows(h_RxGF, i, size), rows(dy_RxD, i, size))
      dx_RxD = jax.lax.dynamic_update_slice_in_dim(dx_RxD, dx, i, 0)
      if train:  # accumulated in place, in float32
        dweights = tuple(dw.at[e].add(g.reshape(dw.shape[1:])) for dw, g in zip(dweights, grads))
      return dx_RxD, dweights

    dweights0 = after(tuple(jnp.zeros(w.shape, jnp.float32) for w in weights), dy_RxD) if train else None
    dx_RxD, dweights = each_expert(weights, start_E, count_E, body, (jnp.zeros_like(x_RxD), dweights0))
    if train:
      dweights = tuple(dw.astype(w.dtype) for dw, w in zip(dweights, weights))
    return dx_RxD, None, None, dweights

  run.defvjp(run_fwd, run_bwd)
  return run


def dropless_blocks(cfg: ModelConfig, n_tokens: int) -> tuple[int, ...]:
  """Row-block sizes of the dropless loop, largest first: the mean load per expert rounded down to a power
  of two in [8, 128], then halved down to 32 rows for each expert's remainder. Most rows go through large
  GEMMs and padding stays below the smallest size per expert (a single block of 128 padded the benchmark's
  32-expert model to 1.4x its rows)."""
  mean_load = n_tokens * cfg.top_k / cfg.n_experts
  sizes = (int(min(128, max(8, 2 ** math.floor(math.log2(max(mean_load, 1)))))),)
  while sizes[-1] > 32:
    sizes += (sizes[-1] // 2,)
  return sizes


BLOCK_ROWS_MAX = 512  # rows per block of `blocked` at most


def block_rows(cfg: ModelConfig, n_tokens: int) -> int:
  """Rows per block of `blocked`: the largest power of two at most a quarter of the mean load per expert, so
  the padding (under a block per expert, and every block computed) keeps the rows, and the expert FLOPs,
  within 1.25x the assignments; BLOCK_ROWS_MAX at most, 1 for loads under 4 (no padding at all)."""
  quarter_load = n_tokens * cfg.top_k / cfg.n_experts / 4
  return 1 if quarter_load < 1 else int(min(BLOCK_ROWS_MAX, 2 ** math.floor(math.log2(quarter_load))))


def blocked_experts(stored, whole: Callable, take: Take, activation: Callable, rows: int, x_RxD, start_E, count_E):
  """Expert-sorted rows [R, D] -> [R, D], each expert's rows starting at start_E and padded to count_E, a
  multiple of `rows`: every block of `rows` rows through its expert's weights, as batched matmuls over chunks
  of as many blocks as there are experts, one chunk after another (a scan of a fixed count: each chunk takes
  at most a layer's worth of expert weights, whatever the load). `stored`: this device's weights (an fsdp
  shard); whole(stored, when): the layer's (w_in, b_in, w_out, b_out) for `take`, gathered once `when` is.
  The backward pass calls `whole` again (nothing of it kept between the passes), adds each chunk's weight
  gradients in place into float32 buffers and sends them back through whole's transpose (a reduce-scatter)."""
  R, D = x_RxD.shape
  n_blocks, n_experts = R // rows, start_E.shape[0]
  ends_E = start_E + count_E  # block j belongs to the first expert ending past its first row
  experts_J = jnp.searchsorted(ends_E, jnp.arange(n_blocks) * rows, side="right", method="compare_all")  # no loop
  experts_J = jnp.minimum(experts_J, n_experts - 1)  # blocks past every expert's rows: zeros
  chunk = min(n_experts, n_blocks)
  in_chunks = n_blocks // chunk * chunk  # blocks in whole chunks; the rest is one shorter chunk

  def chunked(fn, carry, *arrays_J):
    """fn(carry, *chunk) -> (carry, out) over the whole chunks in a scan, then over the rest; outs joined."""
    split = lambda a: a[:in_chunks].reshape(in_chunks // chunk, chunk, *a.shape[1:])  # noqa: E731
    carry, outs = jax.lax.scan(lambda c, xs: fn(c, *xs), carry, tuple(split(a) for a in arrays_J))
    outs = jax.tree.map(lambda o: o.reshape(in_chunks, *o.shape[2:]), outs)
    if in_chunks < n_blocks:
      carry, rest = fn(carry, *(a[in_chunks:] for a in arrays_J))
      outs = jax.tree.map(lambda o, r: jnp.concatenate([o, r]), outs, rest)
    return carry, outs

  def forward(weights, x_JxRxD, experts_J):
    """y [J, rows, D] and the pre-activations [J, rows, G*F]."""
    def one(_, x_CxRxD, e_C):
      w_in, b_in, w_out, b_out = take(weights, e_C)
      h = jnp.einsum("crd,cdf->crf", x_CxRxD, w_in) + b_in[:, None]
      return None, (jnp.einsum("crf,cfd->crd", activation(h), w_out) + b_out[:, None], h)
    return chunked(one, None, x_JxRxD, experts_J)[1]

  def backward(weights, x_JxRxD, h_JxRxGF, dy_JxRxD, experts_J, train):
    def one(dweights, x, h, dy, e_C):
      dx, grads = ffn_backward(activation, take(weights, e_C), x, h, dy)
      if train:
        dweights = tuple(dw.at[e_C].add(g.reshape(-1, *dw.shape[1:])) for dw, g in zip(dweights, grads))
      return dweights, dx

    dweights0 = after(tuple(jnp.zeros(w.shape, jnp.float32) for w in weights), dy_JxRxD) if train else None
    dweights, dx = chunked(one, dweights0, x_JxRxD, h_JxRxGF, dy_JxRxD, experts_J)
    return dx, dweights

  return regathered(stored, whole, forward, backward, x_RxD.reshape(n_blocks, rows, D), experts_J).reshape(R, D)


def sorted_dispatch(x_NxD, idx_NxK, w_NxK, n_experts: int, multiple: int, expert_fn: Callable):
  """Dropless, nothing between the experts' rows: the assignments sorted by expert into rows [R, D], R the
  assignments rounded up to a multiple of `multiple`, the rows past them counted as the last expert's (zeros
  in, their outputs never read); expert_fn(rows, count_E)."""
  A = idx_NxK.size
  order_A, _, counts_E, _ = sort_by_expert(idx_NxK, n_experts)
  R = -(-A // multiple) * multiple
  return through_rows(x_NxD, w_NxK, order_A, jnp.arange(A), R,
                      lambda rows: expert_fn(rows, counts_E.at[-1].add(R - A)))


def grouped_experts(stored, whole: Callable, take: Take, activation: Callable, tm: int, x_RxD, count_E):
  """Expert-sorted rows [R, D] (expert e's count_E[e] rows after the ones before it, every row some expert's)
  through their experts by grouped matmuls (gptoss_jax.model.grouped_matmul: megablox's kernels on TPU, tiles of
  tm rows), the weights gathered as blocked_experts does; the backward pass by the same kernels: the rows'
  gradients by gmm against the transposed weights, the weights' by tgmm, in float32."""
  from gptoss_jax.model.grouped_matmul import gmm, tgmm  # Pallas: imported where used
  R, E = x_RxD.shape[0], count_E.shape[0]
  expert_R = jnp.repeat(jnp.arange(E), count_E, total_repeat_length=R)

  def forward(weights, x_RxD, meta):
    count_E, expert_R = meta
    w_in, b_in, w_out, b_out = take(weights, slice(None))
    h = gmm(x_RxD, w_in, count_E, tm, x_RxD.dtype) + b_in[expert_R]
    return gmm(activation(h), w_out, count_E, tm, x_RxD.dtype) + b_out[expert_R], h

  def backward(weights, x_RxD, h_RxGF, dy_RxD, meta, train):
    count_E, expert_R = meta
    w_in, _, w_out, _ = take(weights, slice(None))
    a, activation_vjp = jax.vjp(activation, h_RxGF)
    dh = activation_vjp(gmm(dy_RxD, w_out, count_E, tm, dy_RxD.dtype, transpose_rhs=True))[0]
    dx = gmm(dh, w_in, count_E, tm, x_RxD.dtype, transpose_rhs=True)
    if not train:
      return dx, None
    by_expert = lambda g: jax.ops.segment_sum(g.astype(jnp.float32), expert_R, E)  # noqa: E731
    grads = (tgmm(x_RxD.T, dh, count_E, tm, jnp.float32), by_expert(dh),
             tgmm(a.T, dy_RxD, count_E, tm, jnp.float32), by_expert(dy_RxD))
    return dx, tuple(g.reshape(w.shape) for g, w in zip(grads, weights))

  return regathered(stored, whole, forward, backward, x_RxD, (count_E, expert_R))


def regathered(stored, whole: Callable, forward: Callable, backward: Callable, x, meta):
  """forward(whole(stored, x), x, meta) -> (y, its residual h), whose backward pass gathers the weights again
  (whole(stored, dy): nothing of a layer's whole experts kept from one pass to the other),
  backward(weights, x, h, dy, meta, train) -> (dx, the weights' float32 gradients or None where the weights are
  frozen), and sends those back through whole's transpose (a reduce-scatter under fsdp)."""
  @jax.custom_vjp
  def run(stored, x, meta):
    return forward(whole(stored, x), x, meta)[0]

  def run_fwd(stored, x, meta):
    y, h = forward(whole(stored, x), x, meta)
    return y, (stored, x, meta, h)

  def run_bwd(res, dy):
    stored, x, meta, h = res
    weights, whole_vjp = jax.vjp(lambda stored: whole(stored, dy), stored)
    train = trained(weights)
    dx, dweights = backward(weights, x, h, dy, meta, train)
    dstored = whole_vjp(tuple(dw.astype(w.dtype) for dw, w in zip(dweights, weights)))[0] if train else None
    return dstored, dx, None

  run.defvjp(run_fwd, run_bwd)
  return run(stored, x, meta)


def after(tree, x: jax.Array):
  """tree, computed only once x is: each array plus 0 * x's first element. A layer's whole weights (or
  its gradient buffers) must come to be when the layer runs: left free, XLA hoists every layer's gathering
  and zeroing to the start of the step (all of them alive at once), and merges the backward pass's gathering
  with the forward pass's (one copy kept from one pass to the other). XLA:CPU drops optimization barriers
  before those passes run; an arithmetic dependency it keeps everywhere (a float times 0 is not folded:
  NaN * 0 is NaN)."""
  zero = x.reshape(-1)[0] * 0
  return jax.tree.map(lambda w: w + zero.astype(w.dtype), tree)


def dense_dispatch(activation, x_NxD, idx_NxK, w_NxK, w_in, b_in, w_out, b_out):
  E = w_in.shape[0]
  h = jnp.einsum("nd,edf->nef", x_NxD, w_in) + b_in
  y_NxExD = jnp.einsum("nef,efd->ned", activation(h), w_out) + b_out
  N = x_NxD.shape[0]
  combine_NxE = jnp.zeros((N, E), jnp.float32).at[jnp.arange(N)[:, None], idx_NxK].add(w_NxK)
  return jnp.einsum("ned,ne->nd", y_NxExD, combine_NxE.astype(y_NxExD.dtype))


def ragged_dispatch(activation, x_NxD, idx_NxK, w_NxK, w_in, b_in, w_out, b_out):
  N, K = idx_NxK.shape
  order_A, e_sorted_A, counts_E, _ = sort_by_expert(idx_NxK, w_in.shape[0])
  h = jax.lax.ragged_dot(x_NxD[order_A // K], w_in, counts_E.astype(jnp.int32)) + b_in[e_sorted_A]
  ys_AxD = jax.lax.ragged_dot(activation(h), w_out, counts_E.astype(jnp.int32)) + b_out[e_sorted_A]
  y_NxKxD = jnp.zeros_like(ys_AxD).at[order_A].set(ys_AxD).reshape(N, K, -1)
  return jnp.einsum("nkd,nk->nd", y_NxKxD, w_NxK.astype(y_NxKxD.dtype))
