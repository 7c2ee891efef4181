"""The programs GPUs and TPUs will run, built on a CPU-only install with each platform's own choices
(`model.platform`), lowered and exported for cuda and tpu: the sweeps' training steps at their real shapes
on 1 and 8 devices, gpt-oss-20b's decode step and prefill piece. Their expert matmuls are counted as each
platform's XLA compiles them (gptoss_jax.hlo) against the active expert FLOPs; the cuDNN attention they carry
is looked for where a GPU host would trace it."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import REPO
from gptoss_jax import hlo
from gptoss_jax.config import ModelConfig, RunConfig
from gptoss_jax.config_files import apply_overrides, load_config_file
from gptoss_jax.generate import PREFILL_CHUNKS, decode_step, extend
from gptoss_jax.model import Transformer, cpu_kernels
from gptoss_jax.model.ffn import n_in_proj
from gptoss_jax.sharding import make_mesh
from gptoss_jax.train.step import Trainer

PLATFORMS = {"cuda": "gpu", "tpu": "tpu"}  # lowering platform -> the model's platform
CUDNN_CALLS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")


@pytest.fixture
def gpu_host(monkeypatch):
  """What a process on an H100 with cuDNN 9.10 traces: jax asks cuDNN for its version and the GPU for its
  compute capability while tracing its cuDNN attention, which a CPU-only install cannot answer."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: capability <= "9.0")
  monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda capability: capability == "9.0")


def active_expert_flops(cfg: ModelConfig, tokens: int, training: bool) -> float:
  """2 FLOPs per weight of each assignment's expert (top_k per token), in and out; 3x for a training step."""
  per_assignment = 2 * (cfg.d_model * n_in_proj(cfg) * cfg.d_expert + cfg.d_expert * cfg.d_model)
  return (3 if training else 1) * tokens * cfg.top_k * per_assignment * cfg.n_layers


def largest_runs(scale: str):
  """The dense and the MoE run with the most parameters across the sweeps of a scale, as configured there,
  cut to 2 of their layers (every layer is lowered alike: the widths, batch and length are the run's)."""
  from experiments import sweeps
  runs = [(sweeps.total(r.model), name, r) for name in sweeps.SWEEPS for r in sweeps.build(name, scale).runs]
  for moe in (False, True):
    _, name, run = max((x for x in runs if x[2].model.is_moe == moe), key=lambda x: x[0])
    config = sweeps.Sweep(name, scale, (run,)).config(run, 0, sweeps.SCALES[scale].lrs[0])
    yield run.name, config.replace(model=config.model.replace(n_layers=2))


def lowered_train_step(config: RunConfig, platform: str, devices: int, mesh: dict | None = None):
  """The training step lowered for `platform` on `devices` devices: all data shards, or `mesh`."""
  mesh = dict(data=devices, fsdp=1, tensor=1, expert=1) if mesh is None else mesh
  trainer = Trainer(config.model.replace(platform=PLATFORMS[platform]), config.train, make_mesh(mesh, jax.devices()[:devices]))
  batch = jax.ShapeDtypeStruct((config.train.batch_size, config.data.seq_len + 1), jnp.int32,
                               sharding=trainer.batch_sharding)
  return trainer.train_step.trace(trainer.abstract_state(), batch).lower(lowering_platforms=(platform,))


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("scale", ["small", "gpu"])
def test_each_scales_largest_training_step_for_gpu_and_tpu(gpu_host, scale, platform, devices, capsys):
  """At the scale's widths, batch, sequence length, bfloat16 and padded vocabulary: the MoE's expert matmuls (on
  TPU megablox's kernels, on CUDA XLA's dots) within 1.5x of the active expert FLOPs on every device, none in a loop, no tensor of [experts, tokens, ..];
  the attention of every layer (sinks included) through the platform's fused kernel, forward and backward
  (cuDNN's flash attention on CUDA, splash attention on TPU), and no score matrix."""
  for name, config in largest_runs(scale):
    cfg, tokens = config.model, config.train.batch_size * config.data.seq_len
    text = lowered_train_step(config, platform, devices).as_text(debug_info=True)
    if cfg.is_moe:
      per_device = {tokens // devices, tokens * cfg.top_k // devices}
      shapes = {tuple(int(d) for d in t.split("x")[:-1]) for t in re.findall(r"tensor<((?:\d+x)+)\w+>", text)}
      pairs = {(s[i], s[i + 1]) for s in shapes if len(s) > 2 for i in range(len(s) - 1)}  # adjacent dimensions
      assert not [p for p in pairs if cfg.n_experts in p and per_device & set(p)], name  # (router logits: 2-D)
      counted = hlo.scope_flops(text, "experts", platform, devices)
      kernels = sum(m.flops for m in hlo.matmuls(text, platform, devices) if m.under("experts")
                    and m.op == "tpu_custom_call")  # megablox's; the dots left mix each token's experts' outputs
      assert kernels > 0.95 * counted if platform == "tpu" else kernels == 0
      ratio = counted / active_expert_flops(cfg, tokens // devices, training=True)
      with capsys.disabled():
        print(f"\n{scale} {name} on {devices} {platform} device(s): expert FLOPs per device {counted:.3e}, "
              f"{ratio:.3f}x the active ones")
      assert 1.0 <= ratio <= 1.5, (name, ratio)
    fused = 0 if cfg.attn_dropout else cfg.n_layers  # the fused kernels have no dropout
    if platform == "cuda":
      calls = re.findall(r"custom_call @(__cudnn\$\w+)\(", text)
      assert {c: calls.count(c) for c in CUDNN_CALLS} == {c: fused for c in CUDNN_CALLS}, name
    elif fused:  # splash: its forward kernel and its backward's (one function for every layer)
      assert len(re.findall(r"custom_call @tpu_custom_call\(", text)) >= 2, name
    T = config.data.seq_len
    if fused:
      assert not re.search(rf"tensor<(\d+x)*{T}x{T}xf32>", text), name  # no [.., T, T] scores


@pytest.mark.parametrize("platform, factor, most", [("cuda", 1.0, 1.5), ("tpu", 1.0, 1.5), ("cuda", 0.0, 4 * 1.5)])
def test_expert_parallel_training_step_for_gpu_and_tpu(gpu_host, platform, factor, most, capsys):
  """The gpu scale's largest MoE (64 experts, top-4) on 8 devices, its experts split over 4 of them (2 data
  shards): the routed rows go to their experts and back by ragged_all_to_all (each way, forward and backward, in
  every layer), no expert weight is gathered (no tensor of all 64 experts on a device). With a capacity factor
  of 1 the expert FLOPs per device stay within 1.5x the active ones; dropless, a device computes the rows its 4
  devices could send it at most, up to 4x that (printed)."""
  _, config = list(largest_runs("gpu"))[1]
  config = config.replace(model=config.model.replace(moe_capacity_factor=factor))
  cfg, tokens = config.model, config.train.batch_size * config.data.seq_len
  text = lowered_train_step(config, platform, 8, dict(data=2, expert=4)).as_text(debug_info=True)
  assert len(re.findall(r"custom_call @ragged_all_to_all\(", text)) == 4 * cfg.n_layers
  assert not re.search(rf"all_gather.*-> tensor<{cfg.n_experts}x", text)
  ratio = hlo.scope_flops(text, "experts", platform, 8) / active_expert_flops(cfg, tokens // 8, training=True)
  with capsys.disabled():
    print(f"\ngpu {cfg.n_experts} experts split over 4 of 8 {platform} devices, capacity factor {factor}: expert "
          f"FLOPs per device {ratio:.3f}x the active ones")
  assert 1.0 <= ratio <= most, ratio


def test_cudas_ragged_dot_counts_as_a_dense_dot_over_every_expert():
  """What the counter says of jax.lax.ragged_dot (today's GPU dispatch before this work): every group's FLOPs
  on CUDA and CPU (XLA's RaggedDotRewriter), the rows' own with the cuDNN fusion flag; not counted for TPU."""
  x = jax.ShapeDtypeStruct((64, 16), jnp.float32)
  w = jax.ShapeDtypeStruct((4, 16, 8), jnp.float32)
  sizes = jax.ShapeDtypeStruct((4,), jnp.int32)
  lowered = lambda p: jax.jit(jax.lax.ragged_dot).trace(x, w, sizes).lower(lowering_platforms=(p,))  # noqa: E731
  rows_only = 2 * 64 * 16 * 8
  assert [m.flops for m in hlo.matmuls(lowered("cuda").as_text(), "cuda")] == [4 * rows_only]
  assert [m.flops for m in hlo.matmuls(lowered("cpu").as_text(), "cpu")] == [4 * rows_only]
  assert [m.flops for m in hlo.matmuls(lowered("cuda").as_text(), "cuda", ragged_dot_fusion=True)] == [rows_only]
  assert [m.flops for m in hlo.matmuls(lowered("tpu").as_text(), "tpu")] == [None]


def test_megablox_grouped_matmuls_count_every_tile_their_grid_visits():
  """gmm and tgmm (the TPU's `gmm` dispatch) lowered for TPU: the kernels' declared 2 m k n times the tiles their
  grid visits at most over the rows' tiles, m / tm + G - 1 over m / tm (a group boundary inside a tile visits it
  once more)."""
  from gptoss_jax.model.grouped_matmul import gmm, tgmm
  m, k, n, groups, tm = 512, 256, 384, 4, 128
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
  sizes = jax.ShapeDtypeStruct((groups,), jnp.int32)
  for fn, args in ((lambda lhs, rhs, s: gmm(lhs, rhs, s, tm, jnp.float32), (f32(m, k), f32(groups, k, n), sizes)),
                   (lambda lhs, rhs, s: tgmm(lhs, rhs, s, tm, jnp.float32), (f32(k, m), f32(m, n), sizes))):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert [x.flops for x in hlo.matmuls(text, "tpu")] == [2 * (m + (groups - 1) * tm) * k * n]


def test_loops_count_their_trips_where_the_program_fixes_them():
  """A scan of 5 matmuls counts 5 of them; a loop bounded by a computed value cannot be counted."""
  w = jax.ShapeDtypeStruct((16, 8), jnp.float32)
  scan = lambda x, w: jax.lax.scan(lambda c, x: (c + x @ w, None), jnp.zeros((4, 8)), x)[0]  # noqa: E731
  text = jax.jit(scan).trace(jax.ShapeDtypeStruct((5, 4, 16), jnp.float32), w).lower(
      lowering_platforms=("cuda",)).as_text()
  assert [(m.flops, m.trips) for m in hlo.matmuls(text, "cuda")] == [(5 * 2 * 4 * 16 * 8, 5)]
  dynamic = lambda n, x, w: jax.lax.fori_loop(0, n, lambda i, c: c + x @ w, jnp.zeros((4, 8)))  # noqa: E731
  text = jax.jit(dynamic).trace(jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((4, 16), jnp.float32),
                                w).lower(lowering_platforms=("cuda",)).as_text()
  assert [m.trips for m in hlo.matmuls(text, "cuda")] == [None]


@pytest.mark.parametrize("dispatch, ratio", [("blocked", (1.0, 1.5)), ("ragged", (8.0, 8.1)), ("dense", (4.0, 4.1))])
def test_expert_flops_per_dispatch_as_cuda_compiles_them(dispatch, ratio):
  """gpt_oss:tiny's layer (8 experts, top-2) in a cuda training step on 8 devices: the blocked dispatch within
  1.5x of the active FLOPs, ragged_dot 8x (every expert), dense 4x (every expert, E / top_k)."""
  config = load_config_file(f"{REPO}/configs/gpt_oss.py:tiny")
  apply_overrides(config, {"model.n_layers": "1", "model.moe_dispatch": dispatch})
  config = RunConfig.from_dict(config)
  text = lowered_train_step(config, "cuda", 8).as_text(debug_info=True)
  tokens = config.train.batch_size * config.data.seq_len // 8
  got = hlo.scope_flops(text, "experts", "cuda", 8) / active_expert_flops(config.model, tokens, training=True)
  assert ratio[0] <= got <= ratio[1], got


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("program", ["decode", "prefill"])
def test_gpt_oss_20b_decode_and_prefill_for_gpu_and_tpu(program, platform, devices, capsys):
  """gpt-oss-20b's widths (2 of its layers, bfloat16 experts) traced with each accelerator's choices and
  exported: the decode step reads only each token's experts, a prefill piece of 256 tokens goes through the
  blocked dispatch (split over the devices), both within 1.5x of the active expert FLOPs; no CPU kernel in
  either."""
  cfg = ModelConfig.from_dict(load_config_file(f"{REPO}/configs/gpt_oss.py:20b").model).replace(
      n_layers=2, param_dtype="bfloat16", dtype="bfloat16", max_seq_len=4096, platform=PLATFORMS[platform])
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  cache = jax.eval_shape(lambda: model.init_cache(1, 1024))
  scalar, key = jax.ShapeDtypeStruct((), jnp.int32), jax.eval_shape(lambda: jax.random.key(0))
  if program == "decode":
    fn, args, tokens = functools.partial(decode_step, temperature=0.8, top_p=0.95), (model, scalar, scalar, cache, key), 1
  else:
    tokens = PREFILL_CHUNKS[0]
    fn, args = extend, (model, jax.ShapeDtypeStruct((1, tokens), jnp.int32), scalar, cache)
  mesh = make_mesh(dict(data=devices), jax.devices()[:devices])
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
  text = lowered.as_text(debug_info=True)
  assert cpu_kernels.MXFP4_TARGET not in text and cpu_kernels.BF16_TARGET not in text
  counted = hlo.scope_flops(text, "experts", platform, devices)
  ratio = counted / active_expert_flops(cfg, tokens // devices if tokens % devices == 0 else tokens, training=False)
  with capsys.disabled():
    print(f"\ngpt-oss-20b {program} ({tokens} token(s)) on {devices} {platform} device(s): expert FLOPs per device "
          f"{counted:.3e}, {ratio:.3f}x the active ones")
  assert 1.0 <= ratio <= 1.5
  exported = jax.export.export(jax.jit(fn), platforms=[platform])(*args)
  assert exported.platforms == (platform,)


@pytest.mark.parametrize("program", ["decode", "prefill", "evaluate"])
def test_packed_experts_are_unpacked_one_expert_at_a_time_on_gpu(program):
  """gpt-oss-20b's widths (2 of its layers), experts packed, in a GPU's program (generate's decode step and
  prefill piece, evaluate's forward) exported for cuda: no floating-point tensor holds a whole layer's
  experts (n_experts x d_model x d_expert or more), which would not fit beside the weights on a 16 GB card."""
  from gptoss_jax.evaluate import position_nll
  cfg = ModelConfig.from_dict(load_config_file(f"{REPO}/configs/gpt_oss.py:20b").model).replace(
      n_layers=2, moe_mxfp4=True, param_dtype="bfloat16", dtype="bfloat16", max_seq_len=4096, platform="gpu")
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


def test_a_gpus_training_step_exports_with_its_cudnn_attention(gpu_host):
  """jax.export of gpt_oss:tiny's GPU training step (bfloat16, sinks, sliding windows) on a mesh using every
  axis: serializable once cuDNN's custom calls are allowed (they carry no compatibility guarantee)."""
  config = load_config_file(f"{REPO}/configs/gpt_oss.py:tiny")
  apply_overrides(config, {"train.batch_size": "8", "data.seq_len": "64", "model.dtype": "bfloat16",
                           "model.platform": "gpu"})
  config = RunConfig.from_dict(config)
  trainer = Trainer(config.model, config.train, make_mesh(dict(data=2, fsdp=2, tensor=1, expert=2), jax.devices()[:8]))
  batch = jax.ShapeDtypeStruct((8, 65), jnp.int32, sharding=trainer.batch_sharding)
  allowed = [jax.export.DisabledSafetyCheck.custom_call(c) for c in CUDNN_CALLS + ("ragged_all_to_all",)]
  exported = jax.export.export(trainer.train_step, platforms=["cuda"], disabled_checks=allowed)(
      trainer.abstract_state(), batch)
  assert exported.platforms == ("cuda",) and exported.nr_devices == 8
  text = exported.mlir_module()
  assert all(c in text for c in CUDNN_CALLS) and "sdy.manual_computation" in text
