"""Whole-model behaviour: dropout, auxiliary outputs, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax import ModelConfig, Transformer

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8, d_ff=64)


def test_dropout_zero_is_deterministic():
  model = Transformer(ModelConfig(**SMALL), nnx.Rngs(0))  # train mode, rates 0
  np.testing.assert_array_equal(model(TOKENS), model(TOKENS))


def test_dropout_is_random_in_training_and_off_in_eval():
  model = Transformer(ModelConfig(**SMALL, embed_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1), nnx.Rngs(0))
  assert not np.allclose(model(TOKENS), model(TOKENS))
  model.eval()
  np.testing.assert_array_equal(model(TOKENS), model(TOKENS))


def test_moe_aux_outputs():
  cfg = ModelConfig(**SMALL, n_experts=4, top_k=2, d_expert=16, moe_aux_loss_weight=0.01)
  out = Transformer(cfg, nnx.Rngs(0)).forward(TOKENS)
  assert out.aux["expert_load"].shape == (2, 4)
  np.testing.assert_allclose(out.aux["expert_load"].sum(-1), 1.0, rtol=1e-6)
  assert float(out.aux["moe_aux_loss"]) >= 1.0 - 1e-6  # E * sum(load * prob) is 1 at best balance
  assert float(out.aux["moe_z_loss"]) > 0


def test_bfloat16_compute_keeps_float32_logits():
  cfg = ModelConfig(**SMALL, dtype="bfloat16")
  model = Transformer(cfg, nnx.Rngs(0))
  assert model.blocks[0].attn.wq[...].dtype == jnp.float32
  logits = model(TOKENS)
  assert logits.dtype == jnp.float32
  ref = Transformer(cfg.replace(dtype="float32"), nnx.Rngs(0))(TOKENS)
  np.testing.assert_allclose(logits, ref, atol=0.05 * float(jnp.abs(ref).max()))


def test_tied_embeddings_share_the_table():
  cfg = ModelConfig(**SMALL, tie_embeddings=True)
  model = Transformer(cfg, nnx.Rngs(0))
  assert not hasattr(model, "unembed")
  count = lambda m: sum(v.size for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert count(Transformer(cfg.replace(tie_embeddings=False), nnx.Rngs(0))) - count(model) == 64 * 32
  x = jnp.take(model.embed[...], TOKENS, axis=0)  # the logits are the last hidden state times the table
  positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
  from gptoss_jax.model.positions import rope_cos_sin
  for block in model.blocks:
    x = block(x, positions, rope_cos_sin(cfg, positions), None)[0]
  want = model.final_norm(x) @ model.embed[...].T
  np.testing.assert_allclose(model(TOKENS), want, rtol=1e-5, atol=1e-5)


def test_logits_in_vocabulary_chunks_equal_one_matmul(monkeypatch):
  from gptoss_jax.model import transformer
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 100)), jnp.float32)
  monkeypatch.setattr(transformer, "VOCAB_CHUNK", 7)  # 15 chunks, the last one short
  logits = transformer.unembed_logits(x, w)
  assert logits.shape == (2, 3, 100) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, np.einsum("btd,dv->btv", np.asarray(x), np.asarray(w)), rtol=1e-5, atol=1e-5)
