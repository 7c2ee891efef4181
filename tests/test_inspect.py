"""inspect: model-card counts, formulas for FLOPs and KV bytes, the command line."""

import json
import os

import pytest

from conftest import REPO, run_command
from gptoss_jax import ModelConfig
from gptoss_jax.config_files import model_config_from_file
from gptoss_jax.inspect import mean_context, stats


def _stats(spec, seq_len=None):
  return stats(model_config_from_file(os.path.join(REPO, "configs", spec)), seq_len)


def test_gpt2_124m():
  s = _stats("gpt2.py:124m", 1024)
  assert s.total_params == 124_439_808
  assert s.embedding_params == 1024 * 768  # tied: the token table is the unembedding and counts as active
  assert s.active_params == 124_439_808 - 1024 * 768


def test_model_cards():
  s20, s120 = _stats("gpt_oss.py:20b"), _stats("gpt_oss.py:120b")
  assert s20.total_params == 20_914_757_184 and round(s20.active_params / 1e9, 2) == 3.61
  assert s120.total_params == 116_829_156_672 and round(s120.active_params / 1e9, 2) == 5.13
  assert round(_stats("qwen3.py:30b-a3b").total_params / 1e9, 1) == 30.5
  assert s20.embedding_params == 201088 * 2880
  assert s20.weight_bytes_mxfp4 < 16e9 < s20.weight_bytes_bf16  # 20b with MXFP4 experts fits 16 GB


def test_flops_and_kv_formulas():
  cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                    sliding_window=4, n_experts=4, top_k=1, d_expert=16, tie_embeddings=False)
  s = stats(cfg, seq_len=16)
  per_layer = 32 * 4 * 8 * 2 + 32 * 2 * 8 * 2 + 32 * 4 + (32 * 2 * 16 + 16 * 32)  # q,o + k,v + router + 1 expert
  matmul = 2 * per_layer + 32 * 100  # + unembedding; the embedding lookup is free
  attention = 4 * 4 * 8 * (mean_context(16, 4) + mean_context(16, 0))
  assert s.train_flops_per_token == pytest.approx(3 * (2 * matmul + attention))
  assert mean_context(16, 0) == 8.5 and mean_context(16, 4) == pytest.approx((1 + 2 + 3 + 4 * 13) / 16)
  assert s.kv_bytes_per_token == 2 * 2 * 8 * 2  # one full layer, bf16 K and V
  assert s.kv_window_bytes == 4 * 2 * 2 * 8 * 2


def test_biases_are_not_matmuls_and_expert_biases_are_not_packed():
  """The formula above with every bias on (attention q/k/v/o, the experts' in and out): the parameters grow
  by the biases, the FLOPs not at all, the MXFP4 bytes by the biases at 2 bytes each (only matrices pack)."""
  plain = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                      n_experts=4, top_k=1, d_expert=16, ffn="swiglu", tie_embeddings=False)
  biased = plain.replace(qkv_bias=True, out_bias=True, ffn_bias=True)
  a, b = stats(plain, 16), stats(biased, 16)
  biases = 2 * ((4 + 2 + 2) * 8 + 32 + 4 * (2 * 16 + 32))  # per layer: q, k, v, o; experts' b_in [E, 2, F], b_out [E, D]
  assert b.total_params - a.total_params == biases
  assert b.train_flops_per_token == a.train_flops_per_token
  assert b.weight_bytes_mxfp4 - a.weight_bytes_mxfp4 == 2 * biases
  expert_biases = 2 * 4 * (2 * 16 + 32)
  assert b.active_params - a.active_params == biases - expert_biases * 3 // 4  # 1 of 4 experts' biases active


def test_a_module_nested_in_the_moe_layer_is_counted_by_its_axes_not_its_names(monkeypatch):
  """A shared expert (a dense MLP with the usual w_in / w_out / b_in / b_out names) inside the MoE layer: every
  one of its parameters is active and its matrices cost FLOPs in full (counting by name took it for a routed
  expert, active top_k / n_experts of the time)."""
  from gptoss_jax.model import moe
  from gptoss_jax.model.ffn import MLP
  cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                    n_experts=4, top_k=1, d_expert=16, ffn="gelu", ffn_bias=True, tie_embeddings=False)
  before = stats(cfg, 16)
  original = moe.MoE.__init__

  def with_shared_expert(self, cfg, rngs):
    original(self, cfg, rngs)
    self.shared = MLP(cfg, rngs)

  monkeypatch.setattr(moe.MoE, "__init__", with_shared_expert)
  after = stats(cfg, 16)
  mlp_matrices, mlp_biases = 32 * 64 + 64 * 32, 64 + 32
  assert after.total_params - before.total_params == 2 * (mlp_matrices + mlp_biases)
  assert after.active_params - before.active_params == 2 * (mlp_matrices + mlp_biases)
  assert after.expert_params == before.expert_params
  assert after.train_flops_per_token - before.train_flops_per_token == 3 * 2 * 2 * mlp_matrices


def _cli(*args):
  from gptoss_jax.inspect import main
  return run_command(main, *(a.replace("configs/", f"{REPO}/configs/") for a in args))


def test_cli_json_and_text():
  out = _cli("--config", "configs/gpt2.py:124m", "--json")
  assert out.returncode == 0 and json.loads(out.stdout)["total_params"] == 124_439_808
  out = _cli("--config", "configs/gpt2.py:tiny", "--config.model.n_layers=4")
  assert out.returncode == 0 and "total parameters" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/nope.py"], "config file not found"),
    (["--config", "configs/gpt2.py:tiny", "--config.model.n_heads=3"], "n_heads"),
    (["--config", "configs/gpt2.py:tiny", "--config.model.wat=3"], "unknown config key"),
])
def test_cli_bad_input_is_one_line(args, message):
  out = _cli(*args)
  assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("spec, overrides", [
    ("gpt2:tiny", {}), ("gpt_oss:tiny", {}),
    ("gpt2:tiny", {"model.d_model": "256", "model.n_layers": "6", "model.n_heads": "4", "model.head_dim": "64",
                   "model.d_ff": "1024"})])
def test_train_memory_estimate_is_near_xlas_own_analysis_of_the_compiled_step(spec, overrides):
  """The dry-run's memory figure against XLA's memory analysis of the real train step (CPU, one device)."""
  import jax
  import jax.numpy as jnp
  from gptoss_jax.config import RunConfig
  from gptoss_jax.config_files import apply_overrides, load_config_file
  from gptoss_jax.inspect import train_memory_bytes
  from gptoss_jax.sharding import make_mesh
  from gptoss_jax.train.step import Trainer
  config = load_config_file(spec)
  apply_overrides(config, {"train.batch_size": "16", "data.seq_len": "128", **overrides})
  config = RunConfig.from_dict(config)
  trainer = Trainer(config.model, config.train, make_mesh(config.mesh, jax.devices()[:1]))
  batch = jax.ShapeDtypeStruct((16, 129), jnp.int32, sharding=trainer.batch_sharding)
  m = trainer.train_step.lower(trainer.abstract_state(), batch).compile().memory_analysis()
  xla = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  assert 0.7 < train_memory_bytes(config.model, 128, 16 * 128) / xla < 1.4
