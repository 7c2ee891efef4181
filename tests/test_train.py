"""The training system on 8 fake CPU devices: sharded == single device, exact resume, multi-process,
command-line errors, NaN handling, accumulation, logs."""

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import COMPILE_FLAGS, REPO
from gptoss_jax.config import ConfigError, RunConfig
from gptoss_jax.config_files import apply_overrides, load_config_file
from gptoss_jax.sharding import make_mesh
from gptoss_jax.train.checkpoint import Checkpointer
from gptoss_jax.train.loop import train
from gptoss_jax.train.optimizer import clip_by_global_norm, decays, lr_schedule
from gptoss_jax.data.pipeline import train_dataset
from gptoss_jax.train.metrics import router_health
from gptoss_jax.train.step import Trainer
from gptoss_jax.weights import load_model

DENSE = "configs/gpt2.py:tiny"
MOE = "configs/gpt_oss.py:tiny"


def run_config(spec, dataset, **overrides):
  config = load_config_file(os.path.join(REPO, spec))
  base = {"data.dir": str(dataset), "data.seq_len": "32", "train.batch_size": "8", "train.steps": "6",
          "train.warmup_steps": "2", "train.eval_every": "3", "train.eval_batches": "2", "log.every": "1",
          "log.progress": "false", "checkpoint.every": "100", "checkpoint.async_save": "false",
          "log.peak_flops": "1e12", "model.embed_dropout": "0", "model.attn_dropout": "0", "model.resid_dropout": "0"}
  apply_overrides(config, base | {k: str(v) for k, v in overrides.items()})
  return RunConfig.from_dict(config)


def losses(workdir):
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    row = json.loads(line)
    if "train/loss" in row:
      out[row["step"]] = row["train/loss"]
  return out


def final_params(config, workdir):
  cfg = config.model
  trainer = Trainer(cfg, config.train, make_mesh(config.mesh))
  state, _ = Checkpointer(os.path.join(workdir, "checkpoints")).restore(trainer.abstract_state())
  return state


@pytest.mark.parametrize("spec, mesh, specs", [
    (DENSE, dict(data=2, fsdp=2, tensor=2, expert=1),
     {"blocks.0.attn.wq": P("fsdp", "tensor", None), "embed": P("tensor", "fsdp"),
      "blocks.0.ffn.w_in": P("fsdp", None, "tensor"), "blocks.0.attn_norm.scale": P(None)}),
    (MOE, dict(data=2, fsdp=1, tensor=2, expert=2),
     {"blocks.0.ffn.w_in": P("expert", None, None, "tensor"), "blocks.0.ffn.w_out": P("expert", "tensor", None),
      "blocks.0.attn.wk": P("expert", "tensor", None), "unembed": P("expert", "tensor")}),  # as fsdp outside
    (MOE, dict(data=2, fsdp=4, tensor=1, expert=1),  # the smoke runs' sharding
     {"blocks.0.ffn.w_in": P(None, "fsdp", None, None), "blocks.0.ffn.w_out": P(None, None, "fsdp")}),
    (MOE + "@gpu", dict(data=2, fsdp=4, tensor=1, expert=1), {}),  # a GPU's program: the blocked dispatch
    (MOE + "@tpu", dict(data=2, fsdp=4, tensor=1, expert=1), {}),  # a TPU's: megablox's kernels (interpreted)
])
def test_sharded_step_matches_single_device(text_dataset, spec, mesh, specs):
  """Gradients, the step's metrics (router statistics included) and the updated parameters on 8 devices
  equal one device's: the MoE's tokens routed per shard, in the CPU's program, a GPU's and a TPU's."""
  spec, _, platform = spec.partition("@")
  config = run_config(spec, text_dataset, **{"model.n_layers": 2, "model.platform": platform or "cpu"})
  cfg = config.model
  batch = np.random.default_rng(0).integers(0, 256, (8, 33)).astype(np.int32)
  results = []
  for m in (mesh, dict(data=1, fsdp=1, tensor=1, expert=1)):
    devices = jax.devices()[:math.prod(m.values())]
    trainer = Trainer(cfg, config.train, make_mesh(m, devices))
    state = trainer.init_state()
    tokens = trainer.global_batch(batch)
    grads = jax.jit(trainer._on_mesh(jax.grad(lambda p: trainer._loss(p, state.rest, tokens)[0])))(state.params)
    state, metrics = trainer.train_step(state, tokens)
    results.append((grads, state, metrics))
    if len(devices) == 8:
      for path, var in nnx.to_flat_state(state.params):
        name = ".".join(map(str, path))
        if name in specs:
          assert var.get_value().sharding.spec == specs[name], name
  (g8, s8, m8), (g1, s1, m1) = results
  for name in m1:
    np.testing.assert_allclose(m8[name], m1[name], rtol=1e-5, atol=1e-7, err_msg=name)
  for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=4), dict(data=2, expert=4)])
@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_a_sharded_moe_step_holds_no_collective_inside_a_loop(text_dataset, platform, mesh):
  """Several CPU devices: no collective may sit inside a loop whose trip count follows the routing (XLA's
  partitioning of the dropless loop over the global batch put an all-reduce there, and 8 fake devices
  deadlocked on one, the gpu scale's e16_k2): the CPU's loop and a GPU's blocked dispatch (whose only loops are
  scans of a count fixed in the program), per shard, and with the experts split (the exchanges outside)."""
  config = run_config(MOE, text_dataset, **{"model.n_layers": 1, "model.platform": platform})
  trainer = Trainer(config.model, config.train, make_mesh(mesh | {a: 1 for a in ("data", "fsdp", "tensor", "expert")
                                                                  if a not in mesh}))
  batch = jax.ShapeDtypeStruct((8, 33), np.int32, sharding=trainer.batch_sharding)
  hlo = trainer.train_step.lower(trainer.abstract_state(), batch).compile().as_text()
  collectives = [line for line in hlo.splitlines()
                 if re.search(r" (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)\(", line)]
  assert collectives and not [line for line in collectives if "/while/body/" in line]
  loops = [line for line in hlo.splitlines() if " while(" in line and re.search(r'op_name="[^"]*[/(]moe[/)]', line)]
  routed = [line for line in loops if "known_trip_count" not in line]  # trip counts the routing decides
  assert loops and bool(routed) == (platform == "cpu")  # the GPU's dispatch: scans of a fixed count only


def _compiled_moe_step(config, mesh: dict):
  devices = math.prod(mesh.values())
  trainer = Trainer(config.model, config.train, make_mesh(mesh | {a: 1 for a in ("data", "fsdp", "tensor", "expert")
                                                                  if a not in mesh}, jax.devices()[:devices]))
  batch = jax.ShapeDtypeStruct((config.train.batch_size, config.data.seq_len + 1), np.int32,
                               sharding=trainer.batch_sharding)
  return trainer.train_step.lower(trainer.abstract_state(), batch).compile()


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
@pytest.mark.parametrize("mesh", [dict(data=8), dict(data=2, fsdp=4), dict(data=2, fsdp=2, tensor=2),
                                  dict(data=2, tensor=2, expert=2)])
def test_each_device_routes_only_its_own_tokens(text_dataset, platform, mesh):
  """The compiled program of 8 devices (XLA's partitioning done), 24 x 128 tokens: no op of the MoE layer
  holds a tensor sized by the whole batch's tokens (3,072) or assignments (6,144), and no collective anywhere
  moves one (the global routing's all-gather of router logits and expert ids, its all-reduce of routed rows;
  with fsdp and tensor, the attention's output gathered whole for its projection where the residual stream
  was left free of the batch's split)."""
  config = run_config(MOE, text_dataset, **{"model.n_layers": 1, "model.platform": platform,
                                            "train.batch_size": 24, "data.seq_len": 128})
  text = _compiled_moe_step(config, mesh).as_text()
  whole_batch = re.compile(r"\[(3072|6144)[,\]]")
  moe = [line for line in text.splitlines() if re.search(r'op_name="[^"]*[/(]moe[/)]', line)]
  collectives = [line for line in text.splitlines()
                 if re.search(r" (all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)\(", line)]
  assert moe and collectives
  assert not [line for line in moe + collectives if whole_batch.search(line)]


def test_expert_parallelism_moves_rows_not_weights(text_dataset):
  """8 devices on the `expert` axis, one expert each (the compiled program of a GPU's training step): the MoE layer's
  collectives exchange routed rows (all-to-all) and gather no expert weight (the router's alone: split over
  `expert` as fsdp would), and each device holds an eighth of the experts and of their optimizer state (against
  8 data shards: all of them)."""
  config = run_config(MOE, text_dataset, **{"model.n_layers": 2, "model.platform": "gpu"})
  cfg = config.model
  expert, data = (_compiled_moe_step(config, mesh) for mesh in (dict(expert=8), dict(data=8)))
  moe = [line for line in expert.as_text().splitlines() if re.search(r'op_name="[^"]*[/(]moe[/)]', line)]
  kinds = {m.group(1) for line in moe  # (an all-to-all of several operands: a tuple, its type with spaces)
           if (m := re.search(r" (all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)\(", line))}
  gathered = [line for line in moe if re.search(rf"= \w+\[{cfg.n_experts},\S* all-gather\(", line)]
  assert "all-to-all" in kinds and "all-gather" in kinds and not gathered, kinds
  per_layer = cfg.n_experts * (cfg.d_model * 2 * cfg.d_expert + cfg.d_expert * cfg.d_model) * 4  # float32
  saved = data.memory_analysis().argument_size_in_bytes - expert.memory_analysis().argument_size_in_bytes
  assert saved >= 3 * cfg.n_layers * per_layer * 7 / 8  # weights and Adam's two moments


def test_per_device_activation_memory_shrinks_with_the_data_shards(text_dataset):
  """A GPU's MoE training step (XLA's memory analysis of its compiled CPU program): on 8 data shards each
  device's temporaries are an eighth of one device's, plus the gradients and updates of its replicated state
  (which data parallelism does not shard)."""
  config = run_config(MOE, text_dataset, **{"model.n_layers": 2, "model.platform": "gpu",
                                            "train.batch_size": 64, "data.seq_len": 128})
  one, eight = (_compiled_moe_step(config, dict(data=n)).memory_analysis() for n in (1, 8))
  assert eight.temp_size_in_bytes <= one.temp_size_in_bytes / 8 + 2 * one.argument_size_in_bytes


def test_fsdp_gathers_one_layers_experts_at_a_time(text_dataset):
  """A GPU's MoE training step on 8 fsdp shards (XLA's memory analysis of its compiled CPU program): each
  layer's experts are gathered whole when that layer runs, forward and again backward, so each layer adds
  to a device's temporaries much less than its experts whole in float32. (Before: every layer's experts
  gathered at the step's start and kept to the backward pass, every layer's float32 gradient buffers zeroed
  there too: about three times that per layer.)"""
  E, D, F = 16, 64, 512
  one_layer = E * (D * 2 * F + F * D) * 4  # SwiGLU's two input projections and the output one, float32

  def temps(layers):
    config = run_config(MOE, text_dataset, **{"model.n_layers": layers, "model.platform": "gpu",
                                              "model.n_experts": E, "model.d_model": D, "model.d_expert": F})
    return _compiled_moe_step(config, dict(fsdp=8)).memory_analysis().temp_size_in_bytes

  per_layer = (temps(4) - temps(2)) / 2
  print(f"temporaries per layer {per_layer / 2**20:.2f} MiB, one layer's experts in float32 {one_layer / 2**20:.2f} MiB")
  assert per_layer < one_layer / 2


def test_resume_is_exact_and_a_finished_training_keeps_its_weights_alone(text_dataset, tmp_path):
  """6 steps straight == 3 steps, stop, resume, 3 more: losses and parameters (dropout on: RNG resumes too).
  The straight run keeps its optimizer state (checkpoint.keep_optimizer); the resumed one, by default, ends
  with its final weights alone in place of every checkpoint: the same parameters, a third of the disk, read
  by load_model; the same command again does nothing, and more steps are refused (no optimizer state)."""
  dropout = {"model.embed_dropout": 0.1, "model.resid_dropout": 0.1, "model.attn_dropout": 0.1}
  straight = run_config(DENSE, text_dataset, **dropout, **{"checkpoint.keep_optimizer": True})
  train(straight, tmp_path / "straight")
  resumed = run_config(DENSE, text_dataset, **dropout)
  train(dataclasses.replace(resumed, train=dataclasses.replace(resumed.train, stop_at=3)), tmp_path / "resumed")
  assert sorted(losses(tmp_path / "resumed")) == [1, 2, 3]
  train(resumed, tmp_path / "resumed")
  assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
  a = final_params(straight, tmp_path / "straight")
  assert int(a.step) == 6
  checkpoints = tmp_path / "resumed" / "checkpoints"
  assert Checkpointer(checkpoints).steps() == [6] and sorted(p.name for p in (checkpoints / "6").iterdir()
                                                             if p.is_dir()) == ["record", "weights"]
  size = lambda folder: sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
  assert size(checkpoints) < 0.45 * size(tmp_path / "straight" / "checkpoints")  # Adam: 2 moments a parameter
  _, _, model = load_model(tmp_path / "resumed")
  b = nnx.state(model, nnx.Param)
  assert jax.tree.structure(a.params) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  before = {p: p.stat().st_mtime_ns for p in (tmp_path / "resumed").rglob("*")}
  assert train(resumed, tmp_path / "resumed") == {}
  more = dataclasses.replace(resumed, train=dataclasses.replace(resumed.train, steps=9))
  with pytest.raises(ConfigError, match="kept its final weights only.*keep_optimizer=true"):
    train(more, tmp_path / "resumed")
  assert {p: p.stat().st_mtime_ns for p in (tmp_path / "resumed").rglob("*")} == before


def _cli(workdir, *extra, env=None, **popen):
  args = [sys.executable, "-m", "gptoss_jax.train", "--config", DENSE, "--workdir", str(workdir), *extra]
  return subprocess.Popen(args, cwd=REPO, env=env or os.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **popen)


def _overrides(config_args: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in config_args.items()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_resume_is_exact(text_dataset, tmp_path, sig):
  """SIGTERM and SIGINT (Ctrl-C) alike: a checkpoint at the current step, exit 0, an exact resume."""
  args = _overrides({"data.dir": text_dataset, "data.seq_len": 32, "train.batch_size": 8, "train.steps": 200,
                     "train.warmup_steps": 2, "train.eval_every": 1000, "train.eval_batches": 1, "log.every": 1,
                     "log.progress": "false", "checkpoint.every": 1000, "log.peak_flops": 1e12,
                     "model.n_layers": 1, "model.d_model": 32, "model.d_ff": 64, "train.schedule": "constant"})
  proc = _cli(tmp_path / "run", *args)
  metrics = tmp_path / "run" / "metrics.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
    time.sleep(0.2)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert "stopped by signal" in err
  stopped = max(losses(tmp_path / "run"))
  assert stopped < 200
  resumed = _cli(tmp_path / "run", *args, "--config.train.steps=" + str(stopped + 3))
  assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
  straight = _cli(tmp_path / "straight", *args, "--config.train.steps=" + str(stopped + 3))
  assert straight.wait(timeout=300) == 0
  assert losses(tmp_path / "run") == losses(tmp_path / "straight")  # a constant schedule ignores train.steps


def test_two_processes_agree_with_one(text_dataset, tmp_path):
  args = _overrides({"data.dir": text_dataset, "data.seq_len": 32, "train.batch_size": 8, "train.steps": 3,
                     "train.eval_every": 1000, "train.eval_batches": 1, "log.every": 1, "log.progress": "false",
                     "log.peak_flops": 1e12, "model.embed_dropout": 0, "model.attn_dropout": 0,
                     "model.resid_dropout": 0})
  env = dict(os.environ, XLA_FLAGS=f"{COMPILE_FLAGS} --xla_force_host_platform_device_count=1")
  port = 20000 + os.getpid() % 20000
  procs = [_cli(tmp_path / "two", *args, f"--config.distributed.coordinator=localhost:{port}",
                "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}", env=env)
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
  one = _cli(tmp_path / "one", *args, env=dict(os.environ, XLA_FLAGS=f"{COMPILE_FLAGS} --xla_force_host_platform_device_count=2"))
  assert one.wait(timeout=300) == 0
  a, b = losses(tmp_path / "two"), losses(tmp_path / "one")
  assert sorted(a) == [1, 2, 3]
  for step in a:
    assert a[step] == pytest.approx(b[step], rel=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--config.train.stepz=3"], "unknown config key: train.stepz"),
    (["--config.train.steps=many"], "train.steps"),
    (["--config.mesh.tensor=3"], "mesh"),
    (["--config.train.batch_size=12"], "batch_size 12 does not divide"),
    (["--config.model.n_kv_heads=3"], "n_kv_heads"),
    (["--config.data.seq_len=100000"], "data.seq_len"),
    (["--config.data.source=web"], "data.source"),
    # fails once the run has started (its lock taken, the dataset's preparation begun): no progress bar before the
    # line, no lock left behind
    (["--config.data.source=text", "--config.data.path=/nonexistent/*.txt", "--config.data.dir={tmp}/data"],
     "matches no files"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, extra, message):
  proc = _cli(tmp_path / "w", *[x.format(tmp=tmp_path) for x in extra])
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 2
  assert message in err and len(err.strip().splitlines()) == 1, err
  assert list(tmp_path.iterdir()) == []


def _router_loads(dataset, steps, last=10, edit_params=None, **overrides):
  """Trains the tiny gpt-oss model (width 32) for `steps` on one device (the routers' behaviour does not depend
  on the mesh; the sharded tests above show that); expert loads [steps, layers, experts]."""
  config = run_config(MOE, dataset, **{"model.d_model": 32, "model.head_dim": 8, "train.steps": steps,
                                       "train.warmup_steps": 5} | overrides)
  trainer = Trainer(config.model, config.train, make_mesh(config.mesh, jax.devices()[:1]))
  state = trainer.init_state()
  if edit_params:
    state = state._replace(params=edit_params(state.params))
  batches = iter(train_dataset(dataset, config.data.seq_len, config.train.batch_size, seed=0))
  loads = []
  for _ in range(steps):
    state, metrics = trainer.train_step(state, trainer.global_batch(next(batches)))
    loads.append(np.asarray(metrics["expert_load"]))
  return np.stack(loads)


def _max_load_ratio(loads_SxLxE):
  """The worst layer's max_load_ratio, averaged over the given steps."""
  return float(np.mean([max(v for k, v in router_health(load).items() if "max_load" in k) for load in loads_SxLxE]))


def test_default_balancing_keeps_routers_from_collapsing(text_dataset):
  """8 experts, top-2: collapse is one expert in every token's top-2, max_load_ratio E / k = 4."""
  collapsed = _max_load_ratio(_router_loads(text_dataset, 150, **{"model.moe_aux_loss_weight": 0,
                                                                   "model.moe_z_loss_weight": 0})[-10:])
  balanced = _max_load_ratio(_router_loads(text_dataset, 150)[-10:])  # the defaults: 0.01 and 1e-3
  assert collapsed > 0.85 * 4 and balanced < 0.6 * 4, (collapsed, balanced)


def test_aux_loss_free_bias_moves_load_toward_uniform(text_dataset):
  """Weights frozen (a learning rate of 1e-12), a router biased toward expert 0: only the selection bias
  moves, and it spreads the load; with the update off the load stays where it was."""
  def skew(params):
    for block in params["blocks"].values():
      block["ffn"]["router_b"][...] = block["ffn"]["router_b"][...].at[0].set(0.5)
    return params
  frozen = {"train.lr": 1e-12, "model.moe_aux_loss_weight": 0, "model.moe_z_loss_weight": 0}
  off = _router_loads(text_dataset, 20, edit_params=skew, **frozen)
  on = _router_loads(text_dataset, 20, edit_params=skew, **frozen, **{"model.moe_bias_update_rate": 0.05})
  assert _max_load_ratio(on[:1]) == pytest.approx(_max_load_ratio(off[:1]))  # the same first step
  assert _max_load_ratio(off[-5:]) > 0.95 * _max_load_ratio(off[:1])
  assert _max_load_ratio(on[-5:]) < 0.75 * _max_load_ratio(off[-5:]), (_max_load_ratio(off[-5:]), _max_load_ratio(on[-5:]))


def test_router_health_formula():
  load = np.array([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
  health = router_health(load)
  assert health["moe/max_load_ratio/layer00"] == pytest.approx(2.0)
  assert health["moe/usage_entropy/layer00"] == pytest.approx(math.log(2) / math.log(4))
  assert health["moe/dead_experts/layer00"] == pytest.approx(0.5)
  assert health["moe/max_load_ratio/layer01"] == pytest.approx(1.0)
  assert health["moe/usage_entropy/layer01"] == pytest.approx(1.0)
  assert health["moe/dead_experts/layer01"] == 0.0


def test_microbatches_equal_one_batch(text_dataset):
  batch = np.random.default_rng(0).integers(0, 256, (8, 33)).astype(np.int32)
  params = []
  for m in (1, 4):
    config = run_config(DENSE, text_dataset, **{"train.microbatches": m})
    trainer = Trainer(config.model, config.train, make_mesh(config.mesh))
    state, metrics = trainer.train_step(trainer.init_state(), trainer.global_batch(batch))
    params.append((state.params, float(metrics["loss"]), float(metrics["grad_norm"])))
  assert params[0][1] == pytest.approx(params[1][1], rel=1e-6)
  assert params[0][2] == pytest.approx(params[1][2], rel=1e-5)
  for a, b in zip(jax.tree.leaves(params[0][0]), jax.tree.leaves(params[1][0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_schedule_and_decay_mask():
  t = run_config(DENSE, "unused", **{"train.lr": 1.0, "train.warmup_steps": 10, "train.steps": 110,
                                     "train.min_lr_ratio": 0.1}).train
  schedule = lr_schedule(t)
  assert float(schedule(0)) == 0 and float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(60)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
  assert float(schedule(110)) == pytest.approx(0.1)
  assert decays(("blocks", 0, "attn", "wq"), t) and not decays(("blocks", 0, "attn", "bq"), t)
  assert not decays(("blocks", 0, "attn_norm", "scale"), t) and decays(("embed",), t)
  t = dataclasses.replace(t, decay_embeddings=False)
  assert not decays(("embed",), t) and not decays(("pos_embed", "table"), t)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])  # clipped; left alone
def test_clip_by_global_norm(rng, max_norm):
  grads = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
  norm = math.sqrt(sum(float(np.sum(g**2)) for g in grads.values()))
  clipped, _ = clip_by_global_norm(max_norm).update(grads, None)
  for name, g in grads.items():
    np.testing.assert_allclose(clipped[name], g * min(1.0, max_norm / norm), rtol=1e-6)


def test_logs_tensorboard_and_jsonl(text_dataset, tmp_path):
  config = run_config(MOE, text_dataset, **{"train.steps": 3})
  last = train(config, tmp_path)
  assert {"train/loss", "train/grad_norm", "train/param_norm", "train/lr", "perf/tokens_per_s", "perf/mfu",
          "perf/step_time_s", "train/moe_aux_loss", "train/moe_z_loss", "moe/max_load_ratio/layer00",
          "moe/usage_entropy/layer03", "moe/dead_experts/layer01", "eval/loss", "perf/peak_memory_gib"} <= set(last)
  assert last["train/tokens"] == 3 * 8 * 32  # tokens seen: steps x batch x sequence
  assert json.loads((tmp_path / "config.json").read_text())["model"]["n_experts"] == 8
  heldout = json.loads((tmp_path / "heldout.json").read_text())  # the test split: 2 batches of 8 windows
  assert heldout["windows"] == 2 * 8 == 8 * len(heldout["batch_losses"])
  assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
  tags = set()
  for event in _read_events(tmp_path / "tb"):
    tags |= {v.tag for v in event.summary.value}
  assert {"train/loss", "eval/loss", "moe/expert_load/layer00", "_hparams_/session_start_info"} <= tags


def _read_events(folder):
  """TFRecord framing: u64 length, u32 crc, payload, u32 crc."""
  import struct
  from tensorboardX.proto.event_pb2 import Event
  for path in folder.glob("events.out.tfevents.*"):
    data = path.read_bytes()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      yield Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4


def test_remat_changes_nothing_but_memory(text_dataset):
  batch = np.random.default_rng(0).integers(0, 256, (8, 33)).astype(np.int32)
  out = []
  for remat in (False, True):
    config = run_config(MOE, text_dataset, **{"train.remat": remat, "model.n_layers": 2})
    trainer = Trainer(config.model, config.train, make_mesh(config.mesh))
    state, metrics = trainer.train_step(trainer.init_state(), trainer.global_batch(batch))
    out.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  assert out[0][0] == pytest.approx(out[1][0], rel=1e-6) and out[0][1] == pytest.approx(out[1][1], rel=1e-5)


_MALLOC_PROBE = """
import ctypes, sys
from gptoss_jax.runtime import reuse_step_memory
class Info(ctypes.Structure):  # glibc's struct mallinfo2
  _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
applied = reuse_step_memory() if sys.argv[1] == "on" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.mallinfo2.restype = [ctypes.c_void_p], Info
block = libc.malloc(64 << 20)  # a step's temporary buffer
mapped = libc.mallinfo2().hblkhd
libc.free(block)
import jax
print(applied, mapped >= 64 << 20, libc.mallinfo2().fordblks >= 64 << 20, jax.config.read("jax_cpu_enable_async_dispatch"))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc")
def test_reuse_step_memory_keeps_large_buffers_in_the_heap_on_cpu_only_glibc_hosts():
  """What the call promises, read from glibc's own accounting in a fresh process: a 64 MiB buffer (a step's
  temporaries) comes from the heap, not a fresh mapping, and stays there free for the next step once freed;
  without the call it is mapped and unmapped; steps dispatch synchronously. Skipped when JAX_PLATFORMS names
  an accelerator (the page faults it saves are measured by benchmarks/step_memory.py)."""
  import ctypes
  if not hasattr(ctypes.CDLL(None), "mallinfo2"):
    pytest.skip("glibc < 2.33: no mallinfo2")
  run = lambda mode, platforms: subprocess.run(
      [sys.executable, "-c", _MALLOC_PROBE, mode], cwd=REPO, env={**os.environ, "JAX_PLATFORMS": platforms},
      capture_output=True, text=True, check=True).stdout.split()
  assert run("off", "cpu") == ["False", "True", "False", "True"]  # mapped, and handed back when freed
  assert run("on", "cpu") == ["True", "False", "True", "False"]  # in the heap, kept free; synchronous dispatch
  assert run("on", "cuda") == ["False", "True", "False", "True"]  # an accelerator's host: left alone


def test_inference_commands_take_most_of_an_accelerator_unless_told_otherwise(monkeypatch):
  """evaluate and generate: gpt-oss-20b's 12.8 GiB of weights need more than JAX's default 75% of a 16 GB card."""
  from gptoss_jax import runtime
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  runtime.inference_memory()
  assert float(os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"]) * 14.9 > 12.8  # a 16 GB card shows 14.9 GiB
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
  runtime.inference_memory()
  assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
  for command in ("generate", "evaluate"):
    assert "runtime.inference_memory()" in (Path(REPO) / "gptoss_jax" / f"{command}.py").read_text()


def test_inference_commands_keep_their_compiled_programs_where_told(monkeypatch, tmp_path):
  """generate, evaluate and lm_eval keep compiled programs across runs: in the cache folder unless
  JAX_COMPILATION_CACHE_DIR (here the suite's own) names another place."""
  from gptoss_jax import runtime
  monkeypatch.setenv("GPTOSS_JAX_CACHE", str(tmp_path))
  named = jax.config.jax_compilation_cache_dir
  assert named  # the suite's, from conftest
  try:
    runtime.cache_compilations()
    assert jax.config.jax_compilation_cache_dir == named
    jax.config.update("jax_compilation_cache_dir", None)
    runtime.cache_compilations()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax")
  finally:
    jax.config.update("jax_compilation_cache_dir", named)
  for command in ("generate.py", "evaluate.py", "lm_eval/__main__.py"):
    assert "runtime.cache_compilations()" in (Path(REPO) / "gptoss_jax" / command).read_text()
