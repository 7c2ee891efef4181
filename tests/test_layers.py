"""Norms, positions and feed-forward activations against formulas written plainly here."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from gptoss_jax import ModelConfig
from gptoss_jax.model import ffn, norms, positions


def test_rmsnorm_formula(rng):
  x = rng.normal(size=(2, 3, 8)).astype(np.float32)
  norm = norms.RMSNorm(8, 1e-5)
  norm.scale[...] = rng.normal(size=8).astype(np.float32)
  want = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * np.asarray(norm.scale[...])
  np.testing.assert_allclose(norm(jnp.asarray(x)), want, rtol=1e-5, atol=1e-6)


def test_layernorm_formula(rng):
  x = rng.normal(size=(2, 3, 8)).astype(np.float32) * 3 + 1
  norm = norms.LayerNorm(8, 1e-5)
  norm.scale[...] = rng.normal(size=8).astype(np.float32)
  norm.bias[...] = rng.normal(size=8).astype(np.float32)
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  want = (x - mu) / np.sqrt(var + 1e-5) * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])
  np.testing.assert_allclose(norm(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)


def _rope_reference(x, pos, theta):
  """Half-split rotation: pair (i, i + d/2) rotated by pos * theta^(-2i/d)."""
  d = x.shape[-1]
  out = np.empty_like(x)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      for i in range(d // 2):
        a = pos[b, t] * theta ** (-2 * i / d)
        x1, x2 = x[b, t, :, i], x[b, t, :, i + d // 2]
        out[b, t, :, i] = x1 * math.cos(a) - x2 * math.sin(a)
        out[b, t, :, i + d // 2] = x2 * math.cos(a) + x1 * math.sin(a)
  return out


def test_rope_formula(rng):
  cfg = ModelConfig(head_dim=8, rope_theta=100.0)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  pos = rng.integers(0, 50, size=(2, 5))
  cos, sin = positions.rope_cos_sin(cfg, jnp.asarray(pos))
  np.testing.assert_allclose(positions.apply_rope(jnp.asarray(x), cos, sin), _rope_reference(x, pos, 100.0),
                             rtol=1e-4, atol=1e-4)


def test_rope_scores_depend_only_on_offset(rng):
  cfg = ModelConfig(head_dim=16)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))
  rot = lambda x, p: positions.apply_rope(x, *positions.rope_cos_sin(cfg, jnp.array([[p]])))
  score = lambda m, n: float(jnp.sum(rot(q, m) * rot(k, n)))
  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
  assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-3)


def test_yarn_factor_one_is_plain_rope():
  plain = ModelConfig(head_dim=32, position="rope", rope_theta=150000.0)
  yarn = plain.replace(position="yarn", rope_factor=1.0, yarn_truncate=False)
  f_plain, s_plain = positions.rope_frequencies(plain)
  f_yarn, s_yarn = positions.rope_frequencies(yarn)
  np.testing.assert_allclose(f_yarn, f_plain, rtol=1e-12)
  assert s_yarn == s_plain == 1.0


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_matches_transformers(truncate):
  hf = transformers.GptOssConfig(head_dim=64, num_attention_heads=4, hidden_size=256, rope_parameters={
      "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": truncate,
      "original_max_position_embeddings": 4096, "rope_theta": 150000.0})
  want, want_scale = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
  cfg = ModelConfig(head_dim=64, position="yarn", rope_theta=150000.0, rope_factor=32.0,
                    rope_original_max_len=4096, yarn_truncate=truncate)
  got, scale = positions.rope_frequencies(cfg)
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)
  assert scale == pytest.approx(want_scale) == pytest.approx(0.1 * math.log(32) + 1)


def test_llama3_scaling_matches_transformers():
  params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
  hf = transformers.LlamaConfig(head_dim=128, num_attention_heads=4, hidden_size=512, rope_parameters=params)
  want, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
  cfg = ModelConfig(head_dim=128, position="llama3", rope_theta=500000.0, rope_factor=8.0, rope_original_max_len=8192)
  np.testing.assert_allclose(positions.rope_frequencies(cfg)[0], want.numpy(), rtol=1e-5)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_activations(rng):
  h = rng.normal(size=(3, 2, 16)).astype(np.float32) * 5
  gate, up = h[:, 0], h[:, 1]
  gelu = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
  np.testing.assert_allclose(ffn.activate(ModelConfig(ffn="gelu"), jnp.asarray(h[:, :1])), gelu, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ffn.activate(ModelConfig(ffn="swiglu"), jnp.asarray(h)), gate * _sigmoid(gate) * up,
                             rtol=1e-5, atol=1e-5)
  g, u = np.minimum(gate, 7.0), np.clip(up, -7.0, 7.0)
  want = g * _sigmoid(1.702 * g) * (u + 1)
  np.testing.assert_allclose(ffn.activate(ModelConfig(ffn="clamped_swiglu"), jnp.asarray(h)), want, rtol=1e-5, atol=1e-5)


def test_mlp_formula(rng):
  cfg = ModelConfig(d_model=8, d_ff=16, ffn="swiglu", ffn_bias=True)
  mlp = ffn.MLP(cfg, nnx.Rngs(0))
  mlp.b_in[...] = rng.normal(size=(2, 16)).astype(np.float32)
  mlp.b_out[...] = rng.normal(size=8).astype(np.float32)
  x = rng.normal(size=(2, 3, 8)).astype(np.float32)
  w_in, b_in = np.asarray(mlp.w_in[...]), np.asarray(mlp.b_in[...])
  gate, up = x @ w_in[:, 0] + b_in[0], x @ w_in[:, 1] + b_in[1]
  want = (gate * _sigmoid(gate) * up) @ np.asarray(mlp.w_out[...]) + np.asarray(mlp.b_out[...])
  np.testing.assert_allclose(mlp(jnp.asarray(x))[0], want, rtol=1e-4, atol=1e-5)
