"""Train state, sharded initialization and the jitted train / eval steps (pjit: jax.jit with explicit
in/out shardings, state donated)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptoss_jax.config import ModelConfig, TrainConfig
from gptoss_jax.model import WEIGHTS, Transformer, rngs
from gptoss_jax.model.moe import SelectionBias, balance_step
from gptoss_jax.sharding import batch_sharding, state_shardings
from gptoss_jax.train.loss import cross_entropy, total_loss
from gptoss_jax.train.optimizer import lr_schedule, make_optimizer


class TrainState(NamedTuple):
  step: jax.Array
  params: nnx.State  # float32 master weights
  opt_state: optax.OptState
  rest: nnx.State  # everything not trained: dropout RNG state, packed MXFP4 experts


def balance_routers(rest: nnx.State, load_LxE: jax.Array, rate: float) -> nnx.State:
  """Aux-loss-free balancing after a step: every MoE layer's selection bias moved by its expert load."""
  def one(path, v):
    if not isinstance(v, SelectionBias):
      return v
    return v.replace(balance_step(v.get_value(), load_LxE[path[1].key], rate))  # path: blocks, i, ffn, ...
  return jax.tree_util.tree_map_with_path(one, rest, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _new_model(cfg: ModelConfig, seed: int) -> Transformer:
  return Transformer(cfg, rngs(params=seed, dropout=seed + 1))


class Trainer:
  """Holds the static parts (graph, optimizer, shardings) and the jitted steps."""

  def __init__(self, cfg: ModelConfig, t: TrainConfig, mesh: Mesh):
    self.cfg, self.t, self.mesh = cfg, t, mesh
    self.graphdef, abstract_params, abstract_rest = nnx.split(
        nnx.eval_shape(lambda: _new_model(cfg, t.seed)), nnx.Param, ...)
    self.param_shardings = state_shardings(abstract_params, mesh)
    self.rest_shardings = state_shardings(abstract_rest, mesh)
    self.tx = make_optimizer(t, abstract_params)
    self.schedule = lr_schedule(t)
    opt_shapes = jax.eval_shape(self.tx.init, abstract_params)
    self.opt_shardings = optax.tree_map_params(
        self.tx, lambda _, s: s, opt_shapes, self.param_shardings,
        transform_non_params=lambda _: NamedSharding(mesh, P()))
    replicated = NamedSharding(mesh, P())
    self.state_shardings = TrainState(replicated, self.param_shardings, self.opt_shardings, self.rest_shardings)
    self.batch_sharding = batch_sharding(mesh)
    self.train_step = jax.jit(self._on_mesh(self._train_step), donate_argnums=0,
                              in_shardings=(self.state_shardings, self.batch_sharding),
                              out_shardings=(self.state_shardings, replicated))
    self.eval_step = jax.jit(self._on_mesh(self._eval_step), out_shardings=replicated,
                             in_shardings=(self.param_shardings, self.rest_shardings, self.batch_sharding))

  def _on_mesh(self, fn):
    """fn traced with the mesh in context, where the model sees how many devices share its work (the MoE's
    dispatch choice)."""
    @functools.wraps(fn)
    def traced(*args):
      with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
        return fn(*args)
    return traced

  def init_state(self) -> TrainState:
    """Parameters are created already sharded: no device ever holds the whole model."""
    return jax.jit(self._init, out_shardings=self.state_shardings)()

  def global_batch(self, local_BxT1) -> jax.Array:
    """This process's rows of the batch -> one array sharded over data x fsdp x expert across all processes."""
    return jax.make_array_from_process_local_data(self.batch_sharding, local_BxT1)

  def weights(self, state: TrainState) -> nnx.State:
    """The model's weights in a state (model.WEIGHTS, as a conversion stores them), without the optimizer's."""
    return nnx.state(nnx.merge(self.graphdef, state.params, state.rest), WEIGHTS)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state, for restoring a checkpoint onto this mesh."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        jax.eval_shape(self._init), self.state_shardings)

  def _init(self) -> TrainState:
    _, params, rest = nnx.split(_new_model(self.cfg, self.t.seed), nnx.Param, ...)
    return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params), rest)

  def _loss(self, params, rest, tokens_BxT1):
    model = nnx.merge(self.graphdef, params, rest, copy=True)
    out = model.forward(tokens_BxT1[:, :-1], remat=self.t.remat)
    loss, metrics = total_loss(self.cfg, out, tokens_BxT1[:, 1:])
    return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

  def _train_step(self, state: TrainState, tokens_BxT1: jax.Array):
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    M = self.t.microbatches
    if M == 1:
      (_, (metrics, rest)), grads = grad_fn(state.params, state.rest, tokens_BxT1)
    else:  # gradient accumulation: mean of the microbatch gradients
      micro = tokens_BxT1.reshape(M, tokens_BxT1.shape[0] // M, -1)

      def body(carry, tokens):
        grads, rest = carry
        (_, (metrics, rest)), g = grad_fn(state.params, rest, tokens)
        return (jax.tree.map(jnp.add, grads, g), rest), metrics

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, rest), metrics = jax.lax.scan(body, (zeros, state.rest), micro)
      grads = jax.tree.map(lambda g: g / M, grads)
      metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    if self.cfg.moe_bias_update_rate:
      rest = balance_routers(rest, metrics["expert_load"], self.cfg.moe_bias_update_rate)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics |= {"grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params),
                "lr": self.schedule(state.step)}
    return TrainState(state.step + 1, params, opt_state, rest), metrics

  def _eval_step(self, params, rest, tokens_BxT1):
    model = nnx.merge(self.graphdef, params, rest)
    model.eval()
    return cross_entropy(model(tokens_BxT1[:, :-1]), tokens_BxT1[:, 1:])
