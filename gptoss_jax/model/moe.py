"""Mixture of experts: router, auxiliary losses, and four dispatch strategies.

grouped (default): sort the (token, expert) assignments by expert and compute only those; compute grows
  with the active experts, not the total. Dropless (moe_capacity_factor = 0): each expert's rows padded
  to a multiple of the smallest block (32, or less when the mean load is), a static bound on the number
  of rows, the experts run one after another over their rows in blocks of up to 128 (dropless_blocks,
  expert_loop). With a capacity factor: per-expert buckets of a
  fixed size, one batched matmul, overflow dropped.
ragged: jax.lax.ragged_dot over the sorted assignments (fast grouped GEMM on GPU/TPU; on CPU it
  lowers to a dense dot over all experts).
selected: each (token, expert) assignment through its expert's weights (packed ones by a CPU kernel):
  reads only the chosen experts, for decoding and other small token counts.
dense: every expert on every token, combined with the routing weights (the test reference).
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax.config import ModelConfig
from gptoss_jax.model import cpu_kernels, mxfp4
from gptoss_jax.model.ffn import activate, ffn_init_std_out, n_in_proj
from gptoss_jax.model.linear import project_batched


def route(cfg: ModelConfig, logits_NxE: jax.Array, selection_bias_E: jax.Array | None = None
          ) -> tuple[jax.Array, jax.Array]:
  """Returns routing weights [N, k] and expert indices [N, k].

  The experts are chosen by the logits plus `selection_bias_E` (aux-loss-free balancing: the bias moves
  the choice only, never the weights). With top_k = 1 both routings use Switch's gate, the chosen
  expert's probability under a softmax over all experts: top-k-then-softmax (and renormalising) would
  make the weight a constant 1 and give the router no gradient at all."""
  logits = logits_NxE.astype(jnp.float32)
  choice = logits if selection_bias_E is None else logits + jax.lax.stop_gradient(selection_bias_E)
  _, idx = jax.lax.top_k(choice, cfg.top_k)
  if cfg.routing == "topk_softmax" and cfg.top_k > 1:  # gpt-oss: softmax over the k selected logits
    return jax.nn.softmax(jnp.take_along_axis(logits, idx, axis=-1), axis=-1), idx
  weights = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), idx, axis=-1)  # Qwen3 / Mixtral / Switch
  if cfg.norm_topk_prob and cfg.top_k > 1:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, idx


def aux_losses(logits_NxE: jax.Array, idx_NxK: jax.Array) -> dict[str, jax.Array]:
  """Load-balancing loss (E * sum_e load_e * mean_prob_e; 1 when balanced) and router z-loss."""
  n_experts = logits_NxE.shape[-1]
  logits = logits_NxE.astype(jnp.float32)
  load_E = jnp.bincount(idx_NxK.reshape(-1), length=n_experts) / idx_NxK.size
  mean_prob_E = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)
  return {
      "moe_aux_loss": n_experts * jnp.sum(jax.lax.stop_gradient(load_E) * mean_prob_E),
      "moe_z_loss": jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
      "expert_load": load_E,
  }


class SelectionBias(nnx.Variable):
  """Per-expert bias on the selection logits (aux-loss-free balancing): not trained by the optimizer;
  the train step moves it toward under-loaded experts (`balance_step`)."""


def balance_step(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """DeepSeek-V3's update: each expert's bias up by `rate` when it got less than its share of the
  assignments (1 / E), down when more."""
  return bias_E + rate * jnp.sign(1.0 / load_E.shape[-1] - load_E)


ExpertFn = Callable[[jax.Array], jax.Array]  # [E, C, D] -> [E, C, D]
RowsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # rows [R, D], start_E, count_E -> [R, D]


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


def grouped_dispatch(x_NxD, idx_NxK, w_NxK, n_experts: int, capacity: int, expert_fn: ExpertFn):
  E, C, D = n_experts, capacity, x_NxD.shape[-1]
  order_A, e_sorted_A, _, rank_A = sort_by_expert(idx_NxK, E)
  slot_A = jnp.where(rank_A < C, e_sorted_A * C + rank_A, E * C)  # E * C: dropped
  return through_rows(x_NxD, w_NxK, order_A, slot_A, E * C,
                      lambda rows: expert_fn(rows.reshape(E, C, D)).reshape(E * C, D))


def block_sparse_dispatch(x_NxD, idx_NxK, w_NxK, n_experts: int, align: int, expert_fn: RowsFn):
  """Dropless: the assignments sorted by expert into rows, each expert's padded to a multiple of `align`,
  expert e owning rows [start_E[e], start_E[e] + count_E[e]). The row count is bounded statically
  (A + E * (align - 1), rounded up), so no token is ever dropped."""
  A, E = idx_NxK.size, n_experts
  order_A, e_sorted_A, counts_E, rank_A = sort_by_expert(idx_NxK, E)
  padded_E = -(-counts_E // align) * align
  start_E = jnp.cumsum(padded_E) - padded_E
  n_rows = -(-(A + E * (align - 1)) // align) * align
  return through_rows(x_NxD, w_NxK, order_A, start_E[e_sorted_A] + rank_A, n_rows,
                      lambda rows: expert_fn(rows, start_E, padded_E))


Unpack = Callable[[tuple, jax.Array], tuple]  # (weights, e) -> w_in [D, G*F], b_in [G*F], w_out [F, D], b_out [D]


def _each_expert(blocks: tuple[int, ...], unpack: Unpack, weights, start_E, count_E, body, carry):
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


def expert_loop(activation: Callable[[jax.Array], jax.Array], blocks: tuple[int, ...], unpack: Unpack) -> RowsFn:
  """The experts' FFN over expert-sorted rows as a loop: for each expert, its weights taken once, then its
  rows in blocks of blocks[0] rows and the remainder in the smaller sizes (descending, each dividing the
  one before), so compute follows the real assignments (no weight copy per block; a grouped GEMM for
  CPUs). The backward pass is the same loop, accumulating each expert's weight gradients in float32.
  Weights that are not floating point (packed MXFP4) are frozen: only the input gets a gradient."""

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
    trained = all(jnp.issubdtype(w.dtype, jnp.floating) for w in weights)
    f32 = functools.partial(jnp.dot, preferred_element_type=jnp.float32)

    def body(e, i, size, w, carry):
      (dx_RxD, dweights), (w_in, _, w_out, _) = carry, w
      x, dy = rows(x_RxD, i, size), rows(dy_RxD, i, size)
      a, activation_vjp = jax.vjp(activation, rows(h_RxGF, i, size))
      dh = activation_vjp(dy @ w_out.T)[0]
      dx_RxD = jax.lax.dynamic_update_slice_in_dim(dx_RxD, dh @ w_in.T, i, 0)
      if trained:  # accumulated in place, in float32
        grads = (f32(x.T, dh), jnp.sum(dh, 0, jnp.float32), f32(a.T, dy), jnp.sum(dy, 0, jnp.float32))
        dweights = tuple(dw.at[e].add(g.reshape(dw.shape[1:])) for dw, g in zip(dweights, grads))
      return dx_RxD, dweights

    dweights0 = tuple(jnp.zeros(w.shape, jnp.float32) for w in weights) if trained else None
    dx_RxD, dweights = each_expert(weights, start_E, count_E, body, (jnp.zeros_like(x_RxD), dweights0))
    if trained:
      dweights = tuple(dw.astype(w.dtype) for dw, w in zip(dweights, weights))
    return dx_RxD, None, None, dweights

  run.defvjp(run_fwd, run_bwd)
  return run


# packed experts on CPU with the kernel: up to this many (token, expert) assignments `selected` reads each
# one's expert in place, faster than the loop dequantizing every expert (gpt-oss-20b, one layer,
# benchmarks/packed_dispatch.py: 64 tokens 0.48 s against 3.8 s, 256 tokens 1.6 s against 4.6 s; on a busy
# machine 256: 3.8 against 9.0, 512: 7.7 against 9.4, 1,024: 12.3 against 8.8): prefill pieces (at most 256
# tokens) and evaluation batches of up to 512 tokens
PACKED_SELECTED_MAX = 2048


def partitioned() -> bool:
  """Whether the computation being traced is split over several devices (a mesh in context: the Trainer's
  steps set theirs)."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and mesh.size > 1


def resolved_dispatch(cfg: ModelConfig, n_tokens: int) -> str:
  """`auto`: the selected experts' weights gathered when there are fewer (token, expert) assignments than
  experts (decoding: gpt-oss-20b reads 4 of its 32 experts per token), or up to PACKED_SELECTED_MAX of
  them for packed experts on CPU (prefill); else ragged_dot (a grouped GEMM) on GPU and TPU when
  dropless, and the grouped paths on CPU, where ragged_dot is a dense dot over every expert. On CPU
  split over several devices (fake ones: the tests, `experiments.run --smoke`) dropless is `dense`, every
  expert on every token: XLA's partitioning of the dropless loop puts an all-reduce inside loops whose trip
  counts follow the routing, and there 8 fake devices deadlocked, one of them an iteration behind (the gpu
  scale's `e16_k2`, 5 tries of 5). Packed
  experts never take ragged_dot, which would unpack a layer's experts at once (gpt-oss-20b: 1.6 GB in
  bfloat16, against 50 MB for the dropless loop's one expert at a time)."""
  if cfg.moe_dispatch != "auto":
    return cfg.moe_dispatch
  assignments = n_tokens * cfg.top_k
  packed_on_cpu = cfg.moe_mxfp4 and jax.default_backend() == "cpu" and cpu_kernels.available()
  few = assignments < cfg.n_experts or (packed_on_cpu and assignments <= PACKED_SELECTED_MAX)
  if few and not cfg.moe_capacity_factor:
    return "selected"
  if cfg.moe_capacity_factor or cfg.moe_mxfp4:
    return "grouped"
  if jax.default_backend() in ("gpu", "tpu"):
    return "ragged"
  return "dense" if partitioned() else "grouped"


def grouped_capacity(cfg: ModelConfig, n_tokens: int) -> int:
  capacity = math.ceil(cfg.moe_capacity_factor * n_tokens * cfg.top_k / cfg.n_experts / 8) * 8
  return min(capacity, n_tokens)


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


class MoE(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    E, D, F, G = cfg.n_experts, cfg.d_model, cfg.d_expert, n_in_proj(cfg)
    pdt = jnp.dtype(cfg.param_dtype)
    self.router_w = nnx.Param(jax.random.normal(rngs.params(), (D, E), pdt) * cfg.init_std,
                              axes=("embed", None))
    if cfg.router_bias:
      self.router_b = nnx.Param(jnp.zeros((E,), pdt), axes=(None,))
    if cfg.moe_bias_update_rate:
      self.selection_bias = SelectionBias(jnp.zeros((E,), jnp.float32), axes=(None,))
    w_in = jax.random.normal(rngs.params(), (E, D, G, F), pdt) * cfg.init_std
    w_out = jax.random.normal(rngs.params(), (E, F, D), pdt) * ffn_init_std_out(cfg)
    if cfg.moe_mxfp4:  # stored as the checkpoints do: [E, out, in / 32, 16], blocks along the input
      blocks, scales = mxfp4.quantize(jnp.transpose(w_in, (0, 2, 3, 1)))
      self.w_in_blocks = mxfp4.Packed(blocks, axes=("expert", None, "mlp", None, None))
      self.w_in_scales = mxfp4.Packed(scales, axes=("expert", None, "mlp", None))
      blocks, scales = mxfp4.quantize(jnp.transpose(w_out, (0, 2, 1)))
      self.w_out_blocks = mxfp4.Packed(blocks, axes=("expert", "embed", None, None))
      self.w_out_scales = mxfp4.Packed(scales, axes=("expert", "embed", None))
    else:
      self.w_in = nnx.Param(w_in, axes=("expert", "embed", None, "mlp"))
      self.w_out = nnx.Param(w_out, axes=("expert", "mlp", "embed"))
    if cfg.ffn_bias:
      self.b_in = nnx.Param(jnp.zeros((E, G, F), pdt), axes=("expert", None, "mlp"))
      self.b_out = nnx.Param(jnp.zeros((E, D), pdt), axes=("expert", "embed"))

  def expert_weights(self, dtype) -> tuple[jax.Array, jax.Array]:
    """w_in [E, D, G, F] and w_out [E, F, D] in the compute dtype (MXFP4 dequantized here)."""
    if self.cfg.moe_mxfp4:
      w_in = mxfp4.dequantize(self.w_in_blocks[...], self.w_in_scales[...], dtype)  # [E, G, F, D]
      w_out = mxfp4.dequantize(self.w_out_blocks[...], self.w_out_scales[...], dtype)  # [E, D, F]
      return jnp.transpose(w_in, (0, 3, 1, 2)), jnp.transpose(w_out, (0, 2, 1))
    return self.w_in[...].astype(dtype), self.w_out[...].astype(dtype)

  def loop_weights(self, dtype) -> tuple[tuple, Unpack]:
    """The expert weights as stored and how to take expert e's in the compute dtype (MXFP4 unpacked one
    expert at a time: gpt-oss-20b holds 50 MB of it, not a layer's 1.6 GB)."""
    G, F, D = n_in_proj(self.cfg), self.cfg.d_expert, self.cfg.d_model
    b_in, b_out = (self.b_in[...], self.b_out[...]) if self.cfg.ffn_bias else self.biases(dtype)
    if self.cfg.moe_mxfp4:
      def unpack(w, e):
        in_blocks, in_scales, bias_in, out_blocks, out_scales, bias_out = (x[e] for x in w)
        w_in = mxfp4.dequantize(in_blocks, in_scales, dtype).reshape(G * F, D).T
        w_out = mxfp4.dequantize(out_blocks, out_scales, dtype).T  # [D, F] -> [F, D]
        return w_in, bias_in.reshape(G * F).astype(dtype), w_out, bias_out.astype(dtype)
      return (self.w_in_blocks[...], self.w_in_scales[...], b_in, self.w_out_blocks[...], self.w_out_scales[...],
              b_out), unpack

    def unpack(w, e):
      w_in, b_in, w_out, b_out = (x[e].astype(dtype) for x in w)
      return w_in.reshape(D, G * F), b_in.reshape(G * F), w_out, b_out
    return (self.w_in[...], b_in, self.w_out[...], b_out), unpack

  def selected(self, x_NxD: jax.Array, idx_NxK: jax.Array, w_NxK: jax.Array) -> jax.Array:
    """Each (token, expert) assignment through its own expert's weights: only the chosen experts are read
    (packed ones by `cpu_kernels.mxfp4_matvec`, which never writes a dequantized weight on CPU). The cost follows
    the assignments (an expert chosen twice is read twice), so this is for a few tokens (decoding; and
    prefill pieces and small evaluation batches, for packed experts on CPU: see PACKED_SELECTED_MAX). On CPU it computes
    in float32: XLA:CPU multiplies bfloat16 no faster than float32 (measured)."""
    cfg = self.cfg
    dt = jnp.float32 if jax.default_backend() == "cpu" else x_NxD.dtype
    (N, K), D = idx_NxK.shape, cfg.d_model
    e_A = idx_NxK.reshape(-1)
    x_AxD = jnp.repeat(x_NxD, K, axis=0).astype(dt)
    b_in, b_out = (b[e_A] for b in self.biases(dt))
    A, G, F = e_A.shape[0], n_in_proj(cfg), cfg.d_expert
    if cfg.moe_mxfp4:  # stored [E, out, in / 32, 16]
      h = cpu_kernels.mxfp4_matvec(x_AxD, e_A, self.w_in_blocks[...], self.w_in_scales[...]).astype(dt)
      down = lambda a_AxF: cpu_kernels.mxfp4_matvec(a_AxF, e_A, self.w_out_blocks[...], self.w_out_scales[...]).astype(dt)
    else:  # one matrix-vector product per assignment, the weight as stored ([A, in, out]), its output
      # dimensions flattened (an einsum keeping G and F apart made XLA:CPU copy the weights, 15x slower)
      matvec = lambda x_AxI, w_AxIxO: jax.lax.dot_general(x_AxI, w_AxIxO, (((1,), (1,)), ((0,), (0,))))
      h = matvec(x_AxD, self.w_in[...][e_A].astype(dt).reshape(A, D, G * F))
      down = lambda a_AxF: matvec(a_AxF, self.w_out[...][e_A].astype(dt))
    y_AxD = down(activate(cfg, h.reshape(A, G, F) + b_in)) + b_out
    return jnp.einsum("nkd,nk->nd", y_AxD.reshape(N, K, D), w_NxK.astype(dt)).astype(x_NxD.dtype)

  def biases(self, dtype):
    if not self.cfg.ffn_bias:
      E, G, F, D = self.cfg.n_experts, n_in_proj(self.cfg), self.cfg.d_expert, self.cfg.d_model
      return jnp.zeros((E, G, F), dtype), jnp.zeros((E, D), dtype)
    return self.b_in[...].astype(dtype), self.b_out[...].astype(dtype)

  def __call__(self, x_BxTxD: jax.Array) -> tuple[jax.Array, dict]:
    cfg = self.cfg
    B, T, D = x_BxTxD.shape
    dt = x_BxTxD.dtype
    x_NxD = x_BxTxD.reshape(B * T, D)
    logits_NxE = x_NxD.astype(jnp.float32) @ self.router_w[...].astype(jnp.float32)
    if cfg.router_bias:
      logits_NxE = logits_NxE + self.router_b[...].astype(jnp.float32)
    w_NxK, idx_NxK = route(cfg, logits_NxE, self.selection_bias[...] if cfg.moe_bias_update_rate else None)
    dispatch = resolved_dispatch(cfg, B * T)
    if dispatch == "selected":
      y = self.selected(x_NxD, idx_NxK, w_NxK)
    elif dispatch == "grouped" and not cfg.moe_capacity_factor:  # dropless: experts one after another
      weights, unpack = self.loop_weights(dt)
      G, F, blocks = n_in_proj(cfg), cfg.d_expert, dropless_blocks(cfg, B * T)
      loop = expert_loop(lambda h: activate(cfg, h.reshape(-1, G, F)), blocks, unpack)
      y = block_sparse_dispatch(x_NxD, idx_NxK, w_NxK, cfg.n_experts, blocks[-1],
                                lambda rows, start_E, count_E: loop(rows, start_E, count_E, weights))
    elif dispatch == "dense":
      y = dense_dispatch(cfg, x_NxD, idx_NxK, w_NxK, *self.expert_weights(dt), *self.biases(dt))
    elif dispatch == "ragged":
      y = ragged_dispatch(cfg, x_NxD, idx_NxK, w_NxK, *self.expert_weights(dt), *self.biases(dt))
    else:  # fixed capacity per expert, overflow dropped
      (w_in, w_out), (b_in, b_out) = self.expert_weights(dt), self.biases(dt)

      def expert_fn(x_ExCxD):
        h = project_batched(x_ExCxD, w_in) + b_in[:, None]
        return project_batched(activate(cfg, h), w_out) + b_out[:, None]

      y = grouped_dispatch(x_NxD, idx_NxK, w_NxK, cfg.n_experts, grouped_capacity(cfg, B * T), expert_fn)
    return y.reshape(B, T, D).astype(dt), aux_losses(logits_NxE, idx_NxK)


def dense_dispatch(cfg, x_NxD, idx_NxK, w_NxK, w_in, w_out, b_in, b_out):
  h = jnp.einsum("nd,edgf->negf", x_NxD, w_in) + b_in
  y_NxExD = jnp.einsum("nef,efd->ned", activate(cfg, h), w_out) + b_out
  N = x_NxD.shape[0]
  combine_NxE = jnp.zeros((N, cfg.n_experts), jnp.float32).at[jnp.arange(N)[:, None], idx_NxK].add(w_NxK)
  return jnp.einsum("ned,ne->nd", y_NxExD, combine_NxE.astype(y_NxExD.dtype))


def ragged_dispatch(cfg, x_NxD, idx_NxK, w_NxK, w_in, w_out, b_in, b_out):
  N, K = idx_NxK.shape
  E, D, G, F = w_in.shape
  e_A = idx_NxK.reshape(-1)
  order_A = jnp.argsort(e_A, stable=True)
  e_sorted = e_A[order_A]
  group_sizes = jnp.bincount(e_A, length=E).astype(jnp.int32)
  xs_AxD = x_NxD[order_A // K]
  h = jax.lax.ragged_dot(xs_AxD, w_in.reshape(E, D, G * F), group_sizes).reshape(-1, G, F)
  ys_AxD = jax.lax.ragged_dot(activate(cfg, h + b_in[e_sorted]), w_out, group_sizes) + b_out[e_sorted]
  y_NxKxD = jnp.zeros_like(ys_AxD).at[order_A].set(ys_AxD).reshape(N, K, D)
  return jnp.einsum("nkd,nk->nd", y_NxKxD, w_NxK.astype(y_NxKxD.dtype))
