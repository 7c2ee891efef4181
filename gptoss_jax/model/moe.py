"""Mixture of experts: router, auxiliary losses, the dispatch strategies, and the layer that runs them on
each shard of the tokens.

Every device routes and orders its own tokens: under a mesh the layer is a shard_map over the tokens, split
over every mesh axis that divides them. The weights enter as they are sharded and the layer gathers them
itself when it runs (all-gather; its transpose, a reduce-scatter, hands each device its shard's gradient),
and the blocked dispatch gathers them again in its backward pass rather than keeping a layer's whole experts
from one pass to the other: one layer's at a time on a device. Nothing global happens inside: no all-gather of
the batch's routing, no all-reduce of routed rows, no collective inside a loop whose trip count follows the
routing. The router's statistics
(load-balancing loss, z-loss, expert load) are averaged over the shards: equal to one device's over the batch.
With the experts split over the `expert` mesh axis (expert parallelism: gptoss_jax.model.expert_parallel) the
rows go to their experts instead, by all-to-all, and each device runs its own experts' rows with the dispatch
below; the experts are never gathered over that axis.

Dispatch strategies (`moe_dispatch`; what `auto` takes for each platform: resolved_dispatch):
grouped: dropless (moe_capacity_factor = 0): the experts one after another over their expert-sorted rows in
  blocks (expert_loop), compute following the real assignments: the CPU's grouped GEMM (its loops' trip counts
  follow the routing, so elsewhere it is slow).
capacity: what `grouped` and `auto` resolve to with a capacity factor: per-expert buckets of a fixed size,
  one batched matmul, overflow dropped.
blocked: dropless: the expert-sorted rows in blocks of b rows that each belong to one expert (each expert's
  rows padded to a multiple of b), every block through its expert's weights in batched matmuls over chunks of
  as many blocks as experts (each gathering its blocks' experts' weights), a scan of a fixed count: static
  shapes, no loop on the routing; b is at most a quarter of the mean load per expert, so padding keeps the
  expert FLOPs within 1.25x the active ones. GPU.
gmm: dropless: the expert-sorted rows (no padding between experts) through megablox's grouped matmul kernels,
  forward and backward (gptoss_jax.model.grouped_matmul; MaxText's choice on TPU), tiles of gmm_rows rows: the
  FLOPs within 1.25x the active ones. TPU (elsewhere the same kernels interpreted: slow, for checks).
ragged: jax.lax.ragged_dot over the sorted assignments. XLA rewrites it into an ordinary dot over every expert on
  CUDA unless the experimental cuDNN fusion flag is set, and on CPU (openxla
  xla/hlo/transforms/expanders/ragged_dot_rewriter.cc): n_experts times the active FLOPs there. Explicit only.
selected: each (token, expert) assignment through its expert's weights (packed ones by a CPU kernel): reads
  only the chosen experts, for decoding and other small token counts.
dense: every expert on every token, combined with the routing weights (the test reference).
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from gptoss_jax.config import ModelConfig
from gptoss_jax.model import cpu_kernels, mxfp4
from gptoss_jax.model.expert_parallel import expert_parallel
from gptoss_jax.model.experts import (Take, after, block_rows, block_sparse_dispatch, blocked_experts,
                                     capacity_dispatch, dense_dispatch, dropless_blocks, expert_loop,
                                     grouped_experts, ragged_dispatch, sorted_dispatch)
from gptoss_jax.model.ffn import activate, ffn_init_std_out, n_in_proj
from gptoss_jax.model.linear import project_batched
from gptoss_jax.model.platform import target
from gptoss_jax.sharding import batch_axes, logical_to_spec

Gather = Callable[[dict, jax.Array], dict]  # (some of a layer's weights as a device holds them, when) -> whole


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


def aux_losses(logits_NxE: jax.Array, idx_NxK: jax.Array, axes: tuple[str, ...] = ()) -> dict[str, jax.Array]:
  """Load-balancing loss (E * sum_e load_e * mean_prob_e; 1 when balanced), router z-loss and each expert's
  share of the assignments; inside a shard_map, the means are over the token shards `axes` too (shards of
  equal size: one device's values over all the tokens)."""
  n_experts = logits_NxE.shape[-1]
  logits = logits_NxE.astype(jnp.float32)
  mean = lambda x: jax.lax.pmean(x, axes) if axes else x  # noqa: E731
  load_E = mean(jnp.bincount(idx_NxK.reshape(-1), length=n_experts) / idx_NxK.size)
  mean_prob_E = mean(jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0))
  return {
      "moe_aux_loss": n_experts * jnp.sum(jax.lax.stop_gradient(load_E) * mean_prob_E),
      "moe_z_loss": mean(jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))),
      "expert_load": load_E,
  }


class SelectionBias(nnx.Variable):
  """Per-expert bias on the selection logits (aux-loss-free balancing): not trained by the optimizer;
  the train step moves it toward under-loaded experts (`balance_step`)."""


def balance_step(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """DeepSeek-V3's update: each expert's bias up by `rate` when it got less than its share of the
  assignments (1 / E), down when more."""
  return bias_E + rate * jnp.sign(1.0 / load_E.shape[-1] - load_E)


# packed experts on CPU with the kernel: up to this many (token, expert) assignments `selected` (the kernel, each
# expert's rows read once for all its assignments) is faster than the loop dequantizing every expert in XLA
# (gpt-oss-20b, one layer, benchmarks/packed_dispatch.py, seconds, AMD EPYC: 256 tokens 0.42 against 2.48, 1,024
# tokens 2.01 against 3.74, 2,048 tokens 4.02 against 4.63, 4,096 tokens 9.17 against 7.40): prefill pieces
# (at most 256 tokens) and evaluation batches of up to 2,048 tokens
PACKED_SELECTED_MAX = 8192


def resolved_dispatch(cfg: ModelConfig, n_tokens: int) -> str:
  """`auto`, for a shard of n_tokens tokens in the program of platform `target(cfg)`: the selected experts'
  weights gathered when there are fewer (token, expert) assignments than experts (decoding: gpt-oss-20b reads 4
  of its 32 experts per token), or up to PACKED_SELECTED_MAX of them for packed experts on CPU (prefill); with
  a capacity factor, the fixed buckets (`capacity`); else on CPU the dropless expert loop (`grouped`), on TPU
  megablox's grouped matmul (`gmm`; `blocked` where its smallest tile, GMM_ROWS_MIN rows, is more than a quarter
  of the mean load per expert: a few tokens a device), on GPU `blocked` (the loop's trip counts follow the
  routing, a string of small kernels there; XLA makes a ragged_dot a dense dot over every expert on CUDA; JAX's
  Pallas ragged dots for GPUs are Hopper's and Blackwell's alone, with no VJP). Packed experts take the loop on
  every platform: it unpacks one expert at a time (gpt-oss-20b: 50 MB in bfloat16, against 1.6 GB for a
  layer's experts, which `blocked`'s chunks of blocks could reach)."""
  if cfg.moe_dispatch != "auto":
    return "capacity" if cfg.moe_dispatch == "grouped" and cfg.moe_capacity_factor else cfg.moe_dispatch
  platform = target(cfg)
  assignments = n_tokens * cfg.top_k
  packed_on_cpu = cfg.moe_mxfp4 and platform == "cpu" and cpu_kernels.available()
  few = assignments < cfg.n_experts or (packed_on_cpu and assignments <= PACKED_SELECTED_MAX)
  if few and not cfg.moe_capacity_factor:
    return "selected"
  if cfg.moe_capacity_factor:
    return "capacity"
  if cfg.moe_mxfp4 or platform == "cpu":
    return "grouped"
  return "gmm" if platform == "tpu" and block_rows(cfg, n_tokens) >= GMM_ROWS_MIN else "blocked"


GMM_ROWS_MIN = 16  # rows per tile of `gmm` at least: a bfloat16 TPU tile's sublanes


def gmm_rows(cfg: ModelConfig, n_tokens: int) -> int:
  """Rows per tile of `gmm`: as `blocked`'s blocks (a quarter of the mean load per expert at most, so the tiles
  a group boundary adds, one per expert at most, keep its FLOPs within 1.25x the assignments'), at least
  GMM_ROWS_MIN (`auto` takes `blocked` below that)."""
  return max(GMM_ROWS_MIN, block_rows(cfg, n_tokens))


def grouped_capacity(cfg: ModelConfig, n_tokens: int) -> int:
  capacity = math.ceil(cfg.moe_capacity_factor * n_tokens * cfg.top_k / cfg.n_experts / 8) * 8
  return min(capacity, n_tokens)


def expert_params(cfg: ModelConfig, p: dict, dtype) -> tuple[tuple, Take]:
  """The expert weights as stored and how to take some experts' in the compute dtype: MXFP4 unpacked for
  those experts only (gpt-oss-20b: 50 MB for one, not a layer's 1.6 GB)."""
  E, G, F, D = cfg.n_experts, n_in_proj(cfg), cfg.d_expert, cfg.d_model
  b_in, b_out = (p["b_in"], p["b_out"]) if cfg.ffn_bias else (jnp.zeros((E, G, F), dtype), jnp.zeros((E, D), dtype))
  if cfg.moe_mxfp4:  # stored as the checkpoints do: [E, out, in / 32, 16]
    def take_packed(w, e_C):
      in_blocks, in_scales, bias_in, out_blocks, out_scales, bias_out = (x[e_C] for x in w)
      w_in = mxfp4.dequantize(in_blocks, in_scales, dtype).reshape(-1, G * F, D).swapaxes(1, 2)
      w_out = mxfp4.dequantize(out_blocks, out_scales, dtype).swapaxes(1, 2)  # [C, D, F] -> [C, F, D]
      return w_in, bias_in.reshape(-1, G * F).astype(dtype), w_out, bias_out.astype(dtype)
    return (p["w_in_blocks"], p["w_in_scales"], b_in, p["w_out_blocks"], p["w_out_scales"], b_out), take_packed

  def take(w, e_C):
    w_in, b_in, w_out, b_out = (x[e_C].astype(dtype) for x in w)
    return w_in.reshape(-1, D, G * F), b_in.reshape(-1, G * F), w_out, b_out
  return (p["w_in"], b_in, p["w_out"], b_out), take


def selected(cfg: ModelConfig, p: dict, x_NxD: jax.Array, idx_NxK: jax.Array, w_NxK: jax.Array) -> jax.Array:
  """Each (token, expert) assignment through its own expert's weights: only the chosen experts are read
  (packed ones by `cpu_kernels.mxfp4_matvec`, which never writes a dequantized weight on CPU). The cost follows
  the assignments (an expert chosen twice is read twice), so this is for a few tokens (decoding; and
  prefill pieces and small evaluation batches, for packed experts on CPU: see PACKED_SELECTED_MAX). In a CPU's
  program it computes in float32: XLA:CPU multiplies bfloat16 no faster than float32 (measured)."""
  dt = jnp.float32 if target(cfg) == "cpu" else x_NxD.dtype
  (N, K), D, G, F = idx_NxK.shape, cfg.d_model, n_in_proj(cfg), cfg.d_expert
  e_A = idx_NxK.reshape(-1)
  A = e_A.shape[0]
  x_AxD = jnp.repeat(x_NxD, K, axis=0).astype(dt)
  if cfg.ffn_bias:
    b_in, b_out = p["b_in"][e_A].astype(dt), p["b_out"][e_A].astype(dt)
  else:
    b_in, b_out = jnp.zeros((A, G, F), dt), jnp.zeros((A, D), dt)
  if cfg.moe_mxfp4:  # stored [E, out, in / 32, 16]; a bfloat16 model's inputs may be rounded in the CPU kernel
    product = functools.partial(cpu_kernels.mxfp4_matvec, experts_A=e_A, rounded=x_NxD.dtype == jnp.bfloat16)
    h = product(x_AxD, blocks=p["w_in_blocks"], scales=p["w_in_scales"]).astype(dt)
    down = lambda a_AxF: product(a_AxF, blocks=p["w_out_blocks"], scales=p["w_out_scales"]).astype(dt)  # noqa: E731
  else:  # one matrix-vector product per assignment, the weight as stored ([A, in, out]), its output
    # dimensions flattened (an einsum keeping G and F apart made XLA:CPU copy the weights, 15x slower)
    matvec = lambda x_AxI, w_AxIxO: jax.lax.dot_general(x_AxI, w_AxIxO, (((1,), (1,)), ((0,), (0,))))  # noqa: E731
    h = matvec(x_AxD, p["w_in"][e_A].astype(dt).reshape(A, D, G * F))
    down = lambda a_AxF: matvec(a_AxF, p["w_out"][e_A].astype(dt))  # noqa: E731
  y_AxD = down(activate(cfg, h.reshape(A, G, F) + b_in)) + b_out
  return jnp.einsum("nkd,nk->nd", y_AxD.reshape(N, K, D), w_NxK.astype(dt)).astype(x_NxD.dtype)


def dispatch(cfg: ModelConfig, p: dict, x_NxD: jax.Array, idx_NxK: jax.Array, w_NxK: jax.Array,
             gather: Gather = lambda p, when: p, experts_axis: str | None = None) -> jax.Array:
  """The routed tokens [N, D] through their experts, mixed by their routing weights; p as this device holds
  it, gather(p, when) the layer's whole weights, or with `experts_axis` this device's experts whole (expert
  parallelism over that mesh axis: the rows go to the experts, gptoss_jax.model.expert_parallel)."""
  if experts_axis:  # here: n_experts / n experts, each row one assignment, dropless (the exchange drops)
    local = cfg.replace(n_experts=cfg.n_experts // jax.lax.axis_size(experts_axis), top_k=1, moe_capacity_factor=0.0,
                        moe_dispatch="auto" if cfg.moe_dispatch == "capacity" else cfg.moe_dispatch)
    run = lambda rows, e_R: dispatch(local, p, rows, e_R[:, None], jnp.ones((len(e_R), 1), rows.dtype),  # noqa: E731
                                     gather)
    return expert_parallel(x_NxD, idx_NxK, w_NxK, cfg.n_experts, cfg.moe_capacity_factor, experts_axis, run)
  N, E = x_NxD.shape[0], cfg.n_experts
  kind = resolved_dispatch(cfg, N)
  G, F = n_in_proj(cfg), cfg.d_expert
  activation = lambda h: activate(cfg, h.reshape(*h.shape[:-1], G, F))  # noqa: E731  [..., G*F] -> [..., F]
  if kind in ("blocked", "gmm"):  # gather the weights themselves, in the forward pass and again in the backward
    stored = {k: v for k, v in p.items() if k in EXPERT_WEIGHTS}
    whole = lambda stored, when: expert_params(cfg, gather(stored, when), x_NxD.dtype)[0]  # noqa: E731
    take = expert_params(cfg, p, x_NxD.dtype)[1]
    if kind == "gmm":
      tm = gmm_rows(cfg, N)
      return sorted_dispatch(x_NxD, idx_NxK, w_NxK, E, tm, functools.partial(
          grouped_experts, stored, whole, take, activation, tm))
    rows = block_rows(cfg, N)
    return block_sparse_dispatch(x_NxD, idx_NxK, w_NxK, E, rows, functools.partial(
        blocked_experts, stored, whole, take, activation, rows))
  p = gather(p, x_NxD)
  if kind == "selected":
    return selected(cfg, p, x_NxD, idx_NxK, w_NxK)
  weights, take = expert_params(cfg, p, x_NxD.dtype)
  if kind == "grouped":  # dropless: the experts one after another
    blocks = dropless_blocks(cfg, N)
    loop = expert_loop(activation, blocks, take)
    return block_sparse_dispatch(x_NxD, idx_NxK, w_NxK, E, blocks[-1],
                                 lambda rows, start_E, count_E: loop(rows, start_E, count_E, weights))
  experts = take(weights, slice(None))
  if kind == "dense":
    return dense_dispatch(activation, x_NxD, idx_NxK, w_NxK, *experts)
  if kind == "ragged":
    return ragged_dispatch(activation, x_NxD, idx_NxK, w_NxK, *experts)
  w_in, b_in, w_out, b_out = experts  # fixed capacity per expert, overflow dropped

  def expert_fn(x_ExCxD):
    h = project_batched(x_ExCxD, w_in) + b_in[:, None]
    return project_batched(activation(h), w_out) + b_out[:, None]

  return capacity_dispatch(x_NxD, idx_NxK, w_NxK, E, grouped_capacity(cfg, N), expert_fn)


def moe_tokens(cfg: ModelConfig, x_NxD: jax.Array, p: dict, axes: tuple[str, ...] = (),
               gather: Gather = lambda p, when: p, experts_axis: str | None = None) -> tuple[jax.Array, dict]:
  """The layer over N tokens (one shard's, `axes` naming the mesh axes the tokens are split over, gather
  taking its weights whole, or its experts split over `experts_axis`): router, routing, the experts (under the
  name scope `experts`), the router's statistics."""
  router = gather({k: v for k, v in p.items() if k not in EXPERT_WEIGHTS}, x_NxD)
  logits_NxE = x_NxD.astype(jnp.float32) @ router["router_w"].astype(jnp.float32)
  if cfg.router_bias:
    logits_NxE = logits_NxE + router["router_b"].astype(jnp.float32)
  w_NxK, idx_NxK = route(cfg, logits_NxE, router.get("selection_bias"))
  with jax.named_scope("experts"):
    y_NxD = dispatch(cfg, p, x_NxD, idx_NxK, w_NxK, gather, experts_axis)
  return y_NxD.astype(x_NxD.dtype), aux_losses(logits_NxE, idx_NxK, axes)


def token_axes(mesh, n_tokens: int) -> tuple[str, ...]:
  """The mesh axes the MoE splits its tokens over: every axis of more than one device, in the mesh's order
  (data, fsdp and expert first, as the batch is split), as many as divide the tokens."""
  return batch_axes(mesh, n_tokens, mesh.axis_names)


def on_token_shards(fn: Callable, x_NxD: jax.Array, p: dict, axes_p: dict | None = None) -> tuple[jax.Array, dict]:
  """fn(x_NxD, p, axes, gather, experts_axis) on each device's shard of the tokens where a mesh is in context
  (the Trainer's steps set theirs); the tokens replicated where no axis divides them. Where the experts are
  split over the `expert` mesh axis and so are the tokens, experts_axis names it: expert parallelism, the
  experts never gathered over it (else None, and they are). The weights come in as they are
  sharded (by their logical axes `axes_p`, as the training state is) and fn gathers them whole with
  gather(some of p, when), as fsdp does, once `when` is computed (the layer's input: not hoisted to the step's
  start with every other layer's). The gather's transpose is a reduce-scatter, so each device's weight
  gradients arrive sharded (passed in whole, XLA would gather them before the layer, keep them for the
  backward pass, and all-reduce their whole gradients)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(x_NxD, p)
  axes = token_axes(mesh, x_NxD.shape[0])
  tokens = P(axes) if axes else P()
  logical = {k: (axes_p or {}).get(k) or () for k in p}
  specs = {k: logical_to_spec(logical[k], v.shape, mesh) for k, v in p.items()}
  split = EXPERTS_AXIS in axes and any(name == "expert" and axis == EXPERTS_AXIS  # the experts' own dimension
                                       for k in p for name, axis in zip(logical[k], specs[k]))
  experts_axis = EXPERTS_AXIS if split else None

  def gather(some: dict, when: jax.Array) -> dict:
    def whole(k, w):  # (with the experts split: this device's experts whole)
      for dim, axis in enumerate(specs[k]):
        own = split and logical[k][dim] == "expert"
        w = w if axis is None or own else jax.lax.all_gather(w, axis, axis=dim, tiled=True)
      return w
    return {k: whole(k, w) for k, w in after(some, when).items()}

  # check_vma off: the dropless loop's carries start invariant and become varying; the weights' gradients
  # are summed over the shards all the same (tested equal to one device's)
  return jax.shard_map(functools.partial(fn, axes=axes, gather=gather, experts_axis=experts_axis), mesh=mesh,
                       in_specs=(tokens, specs), out_specs=(tokens, P()), check_vma=False)(x_NxD, p)


EXPERT_WEIGHTS = ("w_in", "b_in", "w_out", "b_out")  # unpacked: floating point, trained
EXPERTS_AXIS = "expert"  # the mesh axis of expert parallelism (the logical axis "expert" maps to it)


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

  def arrays(self) -> dict[str, jax.Array]:
    return {name: v[...] for name, v in vars(self).items() if isinstance(v, nnx.Variable)}

  def expert_weights(self, dtype) -> tuple[jax.Array, jax.Array]:
    """w_in [E, D, G, F] and w_out [E, F, D] in `dtype` (MXFP4 dequantized)."""
    cfg = self.cfg
    weights, take = expert_params(cfg, self.arrays(), dtype)
    w_in, _, w_out, _ = take(weights, slice(None))
    return w_in.reshape(cfg.n_experts, cfg.d_model, n_in_proj(cfg), cfg.d_expert), w_out

  def __call__(self, x_BxTxD: jax.Array) -> tuple[jax.Array, dict]:
    B, T, D = x_BxTxD.shape
    # the experts' weights in the compute dtype before they are gathered to every device (bfloat16: half the
    # gather and its gradient's reduction; their matmuls' gradients are that dtype's anyway); the router's stay
    p = {k: v.astype(x_BxTxD.dtype) if k in EXPERT_WEIGHTS else v for k, v in self.arrays().items()}
    axes_p = {name: v.get_metadata().get("axes") for name, v in vars(self).items() if isinstance(v, nnx.Variable)}
    with jax.named_scope("moe"):
      y_NxD, aux = on_token_shards(functools.partial(moe_tokens, self.cfg), x_BxTxD.reshape(B * T, D), p, axes_p)
    return y_NxD.reshape(B, T, D), aux
