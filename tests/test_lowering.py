"""The fast paths lower for GPU and TPU, shown on a CPU-only install: the real sharded train step of a
dense and a MoE preset on an 8-device mesh using every axis (data, fsdp, tensor, expert), and the decode
step, exported with jax.export for platforms=["cuda"] and ["tpu"]. An op or a sharding that does not
lower there fails here."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import REPO
from gptoss_jax.config import ModelConfig, RunConfig
from gptoss_jax.config_files import apply_overrides, load_config_file
from gptoss_jax.generate import decode_step
from gptoss_jax.model import Transformer
from gptoss_jax.sharding import make_mesh
from gptoss_jax.train.step import Trainer

PLATFORMS = ["cuda", "tpu"]


def _trainer(spec: str, mesh: dict, **model) -> Trainer:
  config = load_config_file(f"{REPO}/{spec}")
  apply_overrides(config, {"train.batch_size": "8", "data.seq_len": "64", **{f"model.{k}": str(v) for k, v in model.items()}})
  config = RunConfig.from_dict(config)
  return Trainer(config.model, config.train, make_mesh(mesh, jax.devices()[:8]))


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("spec, model", [
    ("configs/gpt2.py:tiny", {}),
    ("configs/gpt2.py:tiny", {"attn_impl": "fused", "attn_dropout": 0.0}),  # what auto picks on GPU
    ("configs/gpt_oss.py:tiny", {"moe_dispatch": "ragged"}),  # the GPU / TPU dispatch
    ("configs/gpt_oss.py:tiny", {}),  # the dropless expert loop, the CPU default
])
def test_sharded_train_step_lowers(platform, spec, model):
  trainer = _trainer(spec, dict(data=2, fsdp=2, tensor=1, expert=2) if "gpt_oss" in spec else
                     dict(data=2, fsdp=2, tensor=2, expert=1), **model)
  state = trainer.abstract_state()
  batch = jax.ShapeDtypeStruct((8, 65), jnp.int32, sharding=trainer.batch_sharding)
  exported = jax.export.export(trainer.train_step, platforms=[platform])(state, batch)
  assert exported.platforms == (platform,)
  assert exported.nr_devices == 8
  text = exported.mlir_module()
  assert "sdy.sharding" in text or "mhlo.sharding" in text  # the parameters stay sharded


@pytest.mark.parametrize("packed", [False, True], ids=["bf16", "mxfp4"])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_decode_step_lowers(platform, packed):
  """generate's own decode step (one token through the KV cache, then sampled) of the gpt-oss preset in
  bfloat16, its experts plain or packed (on CPU the few-row products take the CPU kernels: none of them may
  reach another platform)."""
  from gptoss_jax.model import cpu_kernels
  config = load_config_file(f"{REPO}/configs/gpt_oss.py:tiny")
  cfg = ModelConfig.from_dict(config.model).replace(moe_mxfp4=packed, param_dtype="bfloat16", dtype="bfloat16")
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  cache = jax.eval_shape(lambda: model.init_cache(1, 128))
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  step = jax.jit(decode_step, static_argnames=("temperature", "top_p"))
  exported = jax.export.export(step, platforms=[platform])(model, scalar, scalar, cache, key, temperature=0.8, top_p=0.95)
  assert exported.platforms == (platform,)
  assert exported.out_avals[0].shape == ()  # the sampled token
  assert cpu_kernels.MXFP4_TARGET not in exported.mlir_module() and cpu_kernels.BF16_TARGET not in exported.mlir_module()


@pytest.mark.parametrize("scale, devices", [("small", 1), ("gpu", 8)])
def test_each_scales_largest_run_lowers_for_cuda_at_its_real_batch_and_length(scale, devices):
  """The sweeps' real shapes (the scale's batch and sequence length, bfloat16, GPT-2's padded vocabulary) of
  the run with the most parameters across the three sweeps, on the scale's mesh: one GPU per training at
  `small`, a node of 8 at `gpu`."""
  from experiments import sweeps
  runs = [(sweeps.total(r.model), name, r) for name in sweeps.SWEEPS for r in sweeps.build(name, scale).runs]
  _, name, run = max(runs, key=lambda x: x[0])
  config = sweeps.Sweep(name, scale, (run,)).config(run, 0, sweeps.SCALES[scale].lrs[0])
  trainer = Trainer(config.model, config.train, make_mesh(config.mesh, jax.devices()[:devices]))
  batch = jax.ShapeDtypeStruct((config.train.batch_size, config.data.seq_len + 1), jnp.int32,
                               sharding=trainer.batch_sharding)
  exported = jax.export.export(trainer.train_step, platforms=["cuda"])(trainer.abstract_state(), batch)
  assert exported.platforms == ("cuda",) and exported.nr_devices == devices
  assert exported.in_avals[-1].shape == (config.train.batch_size, config.data.seq_len + 1)
  assert run.model.is_moe and config.model.dtype == "bfloat16" and config.model.vocab_size == 50304


@pytest.mark.parametrize("program", ["decode", "prefill", "evaluate"])
def test_packed_experts_are_unpacked_one_expert_at_a_time_on_gpu(program, monkeypatch):
  """gpt-oss-20b's widths (2 of its layers), experts packed, traced as a GPU traces generate's decode step
  and prefill piece and evaluate's forward (every platform choice made for `gpu`), exported for cuda: no
  floating-point tensor holds a whole layer's experts (n_experts x d_model x d_expert or more), which
  would not fit beside the weights on a 16 GB card."""
  from gptoss_jax.evaluate import position_nll
  from gptoss_jax.generate import PREFILL_CHUNKS, extend
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  cfg = ModelConfig.from_dict(load_config_file(f"{REPO}/configs/gpt_oss.py:20b").model).replace(
      n_layers=2, moe_mxfp4=True, param_dtype="bfloat16", dtype="bfloat16", max_seq_len=4096)
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  cache = jax.eval_shape(lambda: model.init_cache(1, 1024))
  scalar, key = jax.ShapeDtypeStruct((), jnp.int32), jax.eval_shape(lambda: jax.random.key(0))
  tokens = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
  if program == "decode":
    fn = jax.jit(functools.partial(decode_step, temperature=0.0, top_p=1.0))
    args = (model, scalar, scalar, cache, key)
  elif program == "prefill":
    fn, args = jax.jit(extend), (model, tokens(1, PREFILL_CHUNKS[0]), scalar, cache)
  else:
    fn, args = position_nll, (model, tokens(2, 513))
  text = jax.export.export(fn, platforms=["cuda"])(*args).mlir_module()
  whole_layer = cfg.n_experts * cfg.d_model * cfg.d_expert
  shapes = [tuple(int(d) for d in dims.split("x")[:-1])
            for dims, _ in re.findall(r"tensor<((?:\d+x)+)(bf16|f16|f32)>", text)]
  assert shapes and not [s for s in shapes if s[0] == cfg.n_experts and math.prod(s) >= whole_layer]
