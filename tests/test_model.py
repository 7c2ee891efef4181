"""Whole-model behaviour: dropout, auxiliary outputs, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss_jax import ModelConfig, Transformer

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8, d_ff=64)


def test_dropout_at_rate_zero_in_training_is_the_model_without_dropout():
  """Rates 0 in training mode give what the same weights give with dropout switched off (eval mode of a
  model with rates 0.1): nothing is dropped or rescaled at rate 0."""
  off = Transformer(ModelConfig(**SMALL), nnx.Rngs(0))  # train mode, rates 0
  on = Transformer(ModelConfig(**SMALL, embed_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1), nnx.Rngs(1))
  nnx.update(on, nnx.state(off, nnx.Param))  # the same weights: only the dropout differs
  assert not np.allclose(on(TOKENS), off(TOKENS))
  on.eval()
  np.testing.assert_array_equal(off(TOKENS), on(TOKENS))


def test_dropout_is_random_in_training_and_off_in_eval():
  model = Transformer(ModelConfig(**SMALL, embed_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1), nnx.Rngs(0))
  assert not np.allclose(model(TOKENS), model(TOKENS))
  model.eval()
  np.testing.assert_array_equal(model(TOKENS), model(TOKENS))


def test_the_models_random_streams_draw_nnxs_own_keys():
  """`rngs` (built for cheap tracing) gives the weights, the RNG state and the dropout masks that nnx.Rngs gives
  for the same seeds: checkpoints and trainings from before it are reproduced."""
  from gptoss_jax.model import rngs
  cfg = ModelConfig(**SMALL, embed_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
  ours, theirs = Transformer(cfg, rngs(params=3, dropout=4)), Transformer(cfg, nnx.Rngs(params=3, dropout=4))
  as_data = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  leaves = lambda m: [as_data(x) for x in jax.tree.leaves(nnx.state(m))]
  assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(theirs))
  for a, b in zip(leaves(ours), leaves(theirs)):
    np.testing.assert_array_equal(a, b)
  step = nnx.jit(lambda m, x: m(x))  # the dropout keys drawn while traced, twice: the streams advance alike
  first, second = step(ours, TOKENS), step(ours, TOKENS)
  np.testing.assert_array_equal(first, step(theirs, TOKENS))
  np.testing.assert_array_equal(second, step(theirs, TOKENS))
  assert not np.allclose(first, second)
  for a, b in zip(leaves(Transformer(cfg, rngs())), leaves(Transformer(cfg, nnx.Rngs(0)))):
    np.testing.assert_array_equal(a, b)


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


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "xla"])
def test_bf16_matvec_equals_numpy(monkeypatch, kernel):
  """A few rows against a bfloat16 weight [in, out], values and both gradients, against numpy in float64
  on the same bfloat16 values: the CPU kernel (needs g++; outputs over several of its tiles) and XLA's
  path, through the same call; and a projection of a few rows takes the kernel exactly when it is there."""
  from gptoss_jax.model import cpu_kernels, linear
  monkeypatch.setenv("GPTOSS_JAX_KERNELS", "1" if kernel else "0")
  cpu_kernels.available.cache_clear()
  jax.clear_caches()
  try:
    if kernel and not cpu_kernels.available():
      pytest.skip("the CPU kernels could not be built here (no g++?)")
    rng = np.random.default_rng(3)
    I, O = 43, 9000  # rows of w in fours and three left over
    w = jnp.asarray(rng.normal(size=(I, O)), jnp.bfloat16)
    w64 = np.asarray(w, np.float64)
    for rows in (1, 5, cpu_kernels.MAX_ROWS):
      x = jnp.asarray(rng.normal(size=(rows, I)), jnp.float32)
      dy = rng.normal(size=(rows, O))
      y, vjp = jax.vjp(cpu_kernels.bf16_matvec, x, w)  # callable either way: the kernel or XLA's product
      dx, dw = vjp(jnp.asarray(dy, jnp.float32))
      np.testing.assert_allclose(y, np.asarray(x, np.float64) @ w64, rtol=1e-5, atol=1e-4)
      np.testing.assert_allclose(dx, dy @ w64.T, rtol=1e-4, atol=1e-3)
      np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(x, np.float64).T @ dy, rtol=1e-2, atol=5e-2)
      assert (cpu_kernels.BF16_TARGET in jax.jit(cpu_kernels.bf16_matvec).lower(x, w).as_text()) == kernel
      for platform in ("cpu", "gpu"):  # a GPU's program never holds the CPU kernel, whatever builds it
        text = jax.jit(lambda x, w: linear.project(x, w, platform=platform)).lower(x, w).as_text()
        assert (cpu_kernels.BF16_TARGET in text) == (kernel and platform == "cpu")
        np.testing.assert_allclose(linear.project(x, w, platform=platform), np.asarray(x, np.float64) @ w64,
                                   rtol=1e-5, atol=1e-4)
    # over 2**20 elements: W's rows split over the threads (an odd number each), several passes of columns
    big = jnp.asarray(rng.normal(size=(I, 400_000)), jnp.bfloat16)
    for rows in (1, cpu_kernels.MAX_ROWS):
      x = jnp.asarray(rng.normal(size=(rows, I)), jnp.float32)
      np.testing.assert_allclose(cpu_kernels.bf16_matvec(x, big), np.asarray(x, np.float64) @ np.asarray(big, np.float64),
                                 rtol=1e-5, atol=1e-4)
    # several weights in one call (decoding's q, k and v), over 2**20 elements together: each its own product,
    # values and gradients; and attention's q, k and v take one call exactly when the kernel is there
    ws = [jnp.asarray(rng.normal(size=(I, O)), jnp.bfloat16) for O in (20_000, 77, 5_000)]
    for rows in (1, 3):
      x = jnp.asarray(rng.normal(size=(rows, I)), jnp.float32)
      ys, vjp = jax.vjp(cpu_kernels.bf16_matvecs, x, ws)
      dys = [jnp.asarray(rng.normal(size=y.shape), jnp.float32) for y in ys]
      dx, dws = vjp(tuple(dys))
      x64 = np.asarray(x, np.float64)
      for y, w, dy, dw in zip(ys, ws, dys, dws):
        np.testing.assert_allclose(y, x64 @ np.asarray(w, np.float64), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(dw, np.float32), x64.T @ np.asarray(dy, np.float64), rtol=1e-2, atol=5e-2)
      np.testing.assert_allclose(dx, sum(np.asarray(dy, np.float64) @ np.asarray(w, np.float64).T
                                         for dy, w in zip(dys, ws)), rtol=1e-4, atol=1e-3)
      text = jax.jit(lambda x, ws: linear.project_each(x, ws, platform="cpu")).lower(x, ws).as_text()
      assert text.count(cpu_kernels.BF16_TARGET) == kernel  # one call for the three, or none
  finally:
    cpu_kernels.available.cache_clear()
    jax.clear_caches()


def test_logits_in_vocabulary_chunks_equal_one_matmul(monkeypatch):
  from gptoss_jax.model import transformer
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 100)), jnp.float32)
  monkeypatch.setattr(transformer, "VOCAB_CHUNK", 7)  # 15 chunks, the last one short
  logits = transformer.unembed_logits(x, w, "cpu")
  assert logits.shape == (2, 3, 100) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, np.einsum("btd,dv->btv", np.asarray(x), np.asarray(w)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-4), (jnp.bfloat16, 0.06)])  # bf16: logits of ~10 rounded
def test_next_token_loss_in_vocabulary_chunks_equals_log_softmax_of_the_whole_logits(monkeypatch, dtype, atol):
  from gptoss_jax.model import transformer
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 5, 8)), dtype)
  w = jnp.asarray(rng.normal(size=(8, 100)), dtype)
  targets = jnp.asarray(rng.integers(0, 100, (2, 5)), jnp.int32)
  monkeypatch.setattr(transformer, "VOCAB_CHUNK", 7)  # 15 chunks, the last one short
  nll = transformer.unembed_nll(x, w, targets, "cpu")
  logits = np.einsum("btd,dv->btv", np.asarray(x, np.float64), np.asarray(w, np.float64))
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  want = logz - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
  assert nll.shape == (2, 5) and nll.dtype == jnp.float32
  np.testing.assert_allclose(nll, want, rtol=0, atol=atol)


def test_cpu_kernels_build_once_per_compiler_and_flags_and_once_for_processes_starting_together(tmp_path,
                                                                                                 monkeypatch):
  """The build (a stand-in that takes a while) runs once for threads starting together (the file lock:
  each opens it on its own, as processes do), again for another compiler version or other flags."""
  import threading
  import time
  from gptoss_jax.model import cpu_kernels
  monkeypatch.setenv("GPTOSS_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(cpu_kernels, "_compiler", lambda: "g++ (Debian 12.2.0-14) 12.2.0")
  builds = []

  def compile_(library, flags):
    builds.append(library.name)
    time.sleep(0.3)
    library.write_bytes(b"built")
  monkeypatch.setattr(cpu_kernels, "_compile", compile_)
  found = []
  threads = [threading.Thread(target=lambda: found.append(cpu_kernels._build())) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(builds) == 1 and len(set(found)) == 1 and found[0].read_bytes() == b"built"
  monkeypatch.setattr(cpu_kernels, "_compiler", lambda: "g++ (Debian 14.2.0-19) 14.2.0")
  newer = cpu_kernels._build()
  monkeypatch.setattr(cpu_kernels, "FLAGS", cpu_kernels.FLAGS + ("-ffast-math",))
  flagged = cpu_kernels._build()
  monkeypatch.setenv("GPTOSS_JAX_KERNELS", "avx2")  # another build asked for
  avx2 = cpu_kernels._build()
  assert len(builds) == 4 and len({found[0], newer, flagged, avx2}) == 4
  assert sorted(p.name for p in tmp_path.glob("*.so")) == sorted(builds)  # nothing half-written left
