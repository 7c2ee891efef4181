"""convert (HF folders, MXFP4 included) -> checkpoints that evaluate loads; errors leave nothing behind."""

import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import gptoss_jax
from conftest import run_command
from gptoss_jax.convert.__main__ import convert
from gptoss_jax.evaluate import evaluate_tokens
from gptoss_jax.model import mxfp4
from gptoss_jax.weights import load_model
from hf_models import save_mxfp4_gpt_oss

TOKENS = np.random.default_rng(2).integers(0, 128, (2, 41))


def _hf_logits_and_loss(model):
  with torch.no_grad():
    logits = model(torch.from_numpy(TOKENS)).logits.numpy()
  logz = torch.logsumexp(torch.from_numpy(logits[:, :-1]), -1).numpy()
  target = np.take_along_axis(logits[:, :-1], TOKENS[:, 1:, None], -1)[..., 0]
  return logits, float(np.mean(logz - target))


@pytest.mark.parametrize("family", ["gpt2", "gpt_oss", "qwen3", "qwen3_moe", "llama"])
def test_converted_checkpoint_matches_transformers(hf_folder, tmp_path, family):
  folder, ref = hf_folder(family)
  convert(str(folder), str(tmp_path / "ckpt"), dtype="float32", progress=False)
  config, cfg, model = load_model(tmp_path / "ckpt")
  assert config.data.seq_len == min(cfg.max_seq_len, 4096) == min(ref.config.max_position_embeddings, 4096)
  want_logits, want_loss = _hf_logits_and_loss(ref)
  got = np.asarray(model(jnp.asarray(TOKENS, jnp.int32)))
  assert np.abs(got - want_logits).max() <= 1e-4 * np.abs(want_logits).max()
  result = evaluate_tokens(model, TOKENS.reshape(-1), 40, 2, np.ones(cfg.vocab_size, np.int64), progress=False)
  flat = TOKENS.reshape(-1)  # evaluate_tokens windows the flat stream: recompute the reference the same way
  windows = np.stack([flat[:41], flat[40:81]])
  with torch.no_grad():
    logits = ref(torch.from_numpy(windows[:, :-1])).logits
  ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               torch.from_numpy(windows[:, 1:]).reshape(-1)).item()
  assert result["tokens"] == 80 and result["loss"] == pytest.approx(ref_loss, rel=1e-5)


@pytest.fixture(scope="module")
def mxfp4_folder(hf_folder, tmp_path_factory):
  folder, _ = hf_folder("gpt_oss")
  return save_mxfp4_gpt_oss(folder, tmp_path_factory.mktemp("mxfp4"))


def test_mxfp4_folder_matches_transformers(mxfp4_folder):
  from safetensors.numpy import load_file
  from transformers.integrations.mxfp4 import convert_moe_packed_tensors
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      mxfp4_folder, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32,
      attn_implementation="eager").eval()
  want_logits, _ = _hf_logits_and_loss(ref)
  raw = load_file(mxfp4_folder / "model.safetensors")
  hf_w = convert_moe_packed_tensors(torch.from_numpy(raw["model.layers.1.mlp.experts.gate_up_proj_blocks"]),
                                    torch.from_numpy(raw["model.layers.1.mlp.experts.gate_up_proj_scales"]),
                                    dtype=torch.float32).numpy()  # [E, in, 2I] interleaved
  for keep in (False, True):
    cfg, model = gptoss_jax.load_pretrained(mxfp4_folder, keep_mxfp4=keep)
    ffn = model.blocks[1].ffn
    w_in, _ = ffn.expert_weights(jnp.float32)  # [E, D, 2, I]
    np.testing.assert_array_equal(w_in[:, :, 0], hf_w[..., 0::2])
    np.testing.assert_array_equal(w_in[:, :, 1], hf_w[..., 1::2])
    assert cfg.moe_mxfp4 == keep and (ffn.w_in_blocks[...].dtype == jnp.uint8 if keep else True)
    got = np.asarray(model(jnp.asarray(TOKENS, jnp.int32)))
    assert np.abs(got - want_logits).max() <= 1e-4 * np.abs(want_logits).max()


def test_keep_mxfp4_checkpoint_round_trip(mxfp4_folder, tmp_path):
  convert(str(mxfp4_folder), str(tmp_path / "packed"), dtype="float32", keep_mxfp4=True, progress=False)
  config, cfg, model = load_model(tmp_path / "packed")
  assert cfg.moe_mxfp4 and config.data.tokenizer == "o200k_harmony"
  _, ref = gptoss_jax.load_pretrained(mxfp4_folder, keep_mxfp4=True)
  np.testing.assert_array_equal(model(jnp.asarray(TOKENS, jnp.int32)), ref(jnp.asarray(TOKENS, jnp.int32)))


def _cli(module, *args):
  return run_command(importlib.import_module(module if module != "gptoss_jax.convert" else f"{module}.__main__").main,
                     *args)


def test_bad_conversions_leave_nothing(hf_folder, tmp_path):
  folder, _ = hf_folder("llama")
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "config.json").write_text((folder / "config.json").read_text())
  data = (folder / "model.safetensors").read_bytes()
  (broken / "model.safetensors").write_bytes(data[:len(data) // 3])
  cases = [(tmp_path / "empty", "no config.json"), (broken, "model.safetensors")]
  (tmp_path / "empty").mkdir()
  for src, message in cases:
    out = _cli("gptoss_jax.convert", "--src", src, "--dst", tmp_path / "out")
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1
  out = _cli("gptoss_jax.convert", "--src", folder, "--dst", tmp_path / "out", "--keep-mxfp4")
  assert out.returncode == 2 and "MXFP4" in out.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "empty"]  # no output, no temporary folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_dataset):
  """A byte-level model trained 4 steps here, checkpoints at steps 2 and 4 (with their optimizer state: a
  finished training keeps only its final weights unless asked)."""
  from test_train import run_config
  from gptoss_jax.train.loop import train
  folder = tmp_path_factory.mktemp("trained") / "run"
  train(run_config("configs/gpt2.py:tiny", text_dataset, **{"train.steps": 4, "checkpoint.every": 2,
                                                            "train.lr": 1e-2, "checkpoint.keep_optimizer": True}),
        folder)
  return folder


def _direct_loss(model, tokens, seq_len):
  """Mean next-token cross-entropy over non-overlapping windows, written out here."""
  n = (len(tokens) - 1) // seq_len
  total = 0.0
  for i in range(n):
    w = tokens[i * seq_len:i * seq_len + seq_len + 1]
    logits = np.asarray(model(jnp.asarray(w[None, :-1], jnp.int32))[0], np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    total += float(np.sum(logz - logits[np.arange(seq_len), w[1:]]))
  return total / (n * seq_len), n * seq_len


def test_evaluate_cli_against_a_direct_computation_at_each_step(trained, text_dataset):
  meta = json.loads((text_dataset / "meta.json").read_text())  # evaluate reads the test split by default
  tokens = np.concatenate([np.fromfile(text_dataset / s["file"], dtype=meta["dtype"])
                           for s in meta["splits"]["test"]["shards"]])
  results = {}
  for step in (2, 4):
    out = _cli("gptoss_jax.evaluate", "--ckpt", trained, "--dataset", text_dataset, "--seq-len", 16, "--step", step,
               "--json")
    assert out.returncode == 0, out.stderr
    results[step] = json.loads(out.stdout)
    want, n = _direct_loss(load_model(trained, step)[2], tokens.astype(np.int64), 16)
    assert results[step]["tokens"] == n == results[step]["bytes"]  # byte tokens: one byte each
    assert results[step]["loss"] == pytest.approx(want, rel=1e-5)
    assert results[step]["bits_per_byte"] == pytest.approx(want / np.log(2), rel=1e-5)
    assert results[step]["perplexity"] == pytest.approx(np.exp(want), rel=1e-5)
  assert results[2]["loss"] != results[4]["loss"]
  out = _cli("gptoss_jax.evaluate", "--ckpt", trained, "--dataset", text_dataset, "--step", 3)
  assert out.returncode == 2 and "no step 3" in out.stderr and len(out.stderr.strip().splitlines()) == 1
  out = _cli("gptoss_jax.evaluate", "--ckpt", trained.parent / "nope", "--dataset", text_dataset)
  assert out.returncode == 2 and "not a checkpoint folder" in out.stderr


def test_generate_cli_greedy_is_the_models_own_argmax_decoding(trained):
  _, _, model = load_model(trained)
  ids, forward = list(b"The "), jax.jit(lambda m, t: m(t))
  for _ in range(8):  # one length for every call (one program): causal, the padding after a position is unseen
    logits = np.asarray(forward(model, jnp.asarray([ids + [0] * (12 - len(ids))], jnp.int32))[0, len(ids) - 1])
    ids.append(int(logits.argmax()))
  out = _cli("gptoss_jax.generate", "--ckpt", trained, "--prompt", "The ", "--max-new-tokens", 8, "--temperature", 0)
  assert out.returncode == 0, out.stderr
  assert out.stdout.rstrip("\n") == bytes(ids).decode("utf-8", "replace")


@pytest.mark.parametrize("tokenizer, vocab", [("byte", 256), ("gpt2", 50257), ("o200k_harmony", 201088)])
def test_hf_round_trip_keeps_the_tokenizer(tmp_path, tokenizer, vocab):
  from flax import nnx
  from gptoss_jax import ModelConfig, Transformer
  from gptoss_jax.convert.__main__ import main as convert_main
  from gptoss_jax.weights import save_model
  from gptoss_jax.config import DataConfig, RunConfig
  cfg = ModelConfig(vocab_size=vocab, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8, d_ff=32)
  config = RunConfig(model=cfg, data=DataConfig(tokenizer=tokenizer, vocab_file="" if tokenizer == "byte" else "pypi"))
  save_model(tmp_path / "ours", config, Transformer(cfg, nnx.Rngs(0)))
  assert convert_main(["--to-hf", "--src", str(tmp_path / "ours"), "--dst", str(tmp_path / "hf")]) == 0
  assert convert_main(["--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "back"), "--dtype", "float32"]) == 0
  back = json.loads((tmp_path / "back" / "config.json").read_text())
  assert back["data"]["tokenizer"] == tokenizer and back["model"]["vocab_size"] == vocab
  # transformers tokenizes the exported folder's text as tiktoken (or the byte tokenizer) does
  from gptoss_jax.data.tokenizers import get_tokenizer
  ours = get_tokenizer(tokenizer, config.data.vocab_file)
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  for text in ("Hello world", "  It's 2026: naïve café, 12345 tokens!\n\tτέλος 日本語 \U0001F600", "a" * 40):
    ids = ours.encode(text)
    assert theirs.encode(text, add_special_tokens=False) == ids, text
    assert theirs.decode(ids) == text


def test_a_conversion_that_fails_midway_leaves_nothing(hf_folder, tmp_path, monkeypatch):
  """The failure comes after the temporary folder exists and holds every written weight."""
  from orbax.checkpoint.experimental import v1
  folder, _ = hf_folder("llama")
  real_finalize, seen = v1.partial.finalize, []

  def finalize_then_fail(path):
    real_finalize(path)
    seen.extend(p.name for p in tmp_path.iterdir())
    raise OSError("disk full")

  monkeypatch.setattr(v1.partial, "finalize", finalize_then_fail)
  with pytest.raises(OSError, match="disk full"):
    convert(str(folder), str(tmp_path / "out"), dtype="float32", progress=False)
  assert any(name.startswith(".out.") for name in seen)  # the temporary folder existed
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", ["gpt2", "gpt_oss", "qwen3", "qwen3_moe", "llama"])
def test_greedy_continuation_matches_transformers(hf_folder, family):
  from gptoss_jax.generate import generate
  folder, ref = hf_folder(family)
  _, model = gptoss_jax.load_pretrained(folder)
  prompt = [int(t) for t in TOKENS[0, :5]]
  ours = generate(model, prompt, 32, temperature=0.0)  # 37 positions: past gpt_oss's window of 8
  with torch.no_grad():
    want = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                        pad_token_id=0)[0, 5:].tolist()
  assert ours == want


def test_sampling_is_seeded_and_top_p_restricts():
  from gptoss_jax.generate import sample
  logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  draws = lambda p, seed: {int(sample(logits, k, 1.0, p)) for k in jax.random.split(jax.random.key(seed), 300)}
  assert draws(0.6, 0) == {0, 1} and draws(1.0, 0) == {0, 1, 2, 3} and draws(0.4, 0) == {0}
  assert int(sample(logits, jax.random.key(0), 0.0, 1.0)) == 0
  a = [int(sample(logits, k, 1.0, 1.0)) for k in jax.random.split(jax.random.key(5), 20)]
  assert a == [int(sample(logits, k, 1.0, 1.0)) for k in jax.random.split(jax.random.key(5), 20)]


def test_a_padded_vocabulary_generates_only_ids_its_tokenizer_has(tmp_path):
  """A byte-level model with 320 ids whose padded ids (256..319) get the largest logits: greedy decoding
  and sampling both keep to the tokenizer's 256, through the library and the command."""
  from flax import nnx
  from gptoss_jax import ModelConfig, Transformer
  from gptoss_jax.config import RunConfig
  from gptoss_jax.generate import generate, sample
  from gptoss_jax.weights import save_model
  logits = jnp.concatenate([jnp.zeros(256), jnp.full(64, 10.0)])
  assert int(sample(logits, jax.random.key(0), 0.0, 1.0)) >= 256  # unmasked, a padded id wins
  for key in jax.random.split(jax.random.key(1), 50):
    assert int(sample(logits, key, 1.0, 1.0, n_valid=256)) < 256 and int(sample(logits, key, 0.0, 1.0, n_valid=256)) < 256
  cfg = ModelConfig(vocab_size=320, max_seq_len=128, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8,
                    d_ff=32, tie_embeddings=False)
  model = Transformer(cfg, nnx.Rngs(0))
  model.unembed.value = model.unembed.value.at[:, 256:].add(5.0)  # the padded ids dominate every position
  assert int(jnp.argmax(model(jnp.asarray([list(b"The ")], jnp.int32))[0, -1])) >= 256
  for temperature in (0.0, 1.0):
    assert max(generate(model, list(b"The "), 12, temperature=temperature, n_valid=256)) < 256
  save_model(tmp_path / "ckpt", RunConfig(model=cfg), model)
  out = _cli("gptoss_jax.generate", "--ckpt", tmp_path / "ckpt", "--prompt", "The ", "--max-new-tokens", 12)
  assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr


def test_sharded_folder_with_index_loads_the_same(hf_folder, tmp_path):
  folder, ref = hf_folder("qwen3")
  ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
  _, plain = gptoss_jax.load_pretrained(folder)
  _, sharded = gptoss_jax.load_pretrained(tmp_path / "sharded")
  tokens = jnp.asarray(TOKENS, jnp.int32)
  np.testing.assert_array_equal(plain(tokens), sharded(tokens))


@pytest.mark.parametrize("family", ["gpt2", "gpt_oss", "qwen3", "qwen3_moe", "llama"])
def test_to_hf_round_trip(hf_folder, tmp_path, family):
  """HF -> checkpoint -> HF: transformers loads the export, and its logits are the original's."""
  folder, ref = hf_folder(family)
  convert(str(folder), str(tmp_path / "ckpt"), dtype="float32", progress=False)
  out = _cli("gptoss_jax.convert", "--to-hf", "--src", tmp_path / "ckpt", "--dst", tmp_path / "hf")
  assert out.returncode == 0, out.stderr
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                           attn_implementation="eager").eval()
  want, _ = _hf_logits_and_loss(ref)
  got, _ = _hf_logits_and_loss(back)
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_trained_checkpoint_exports(text_dataset, tmp_path):
  """A model trained here (the tiny gpt-oss preset) leaves the project as a gpt_oss folder."""
  from test_train import run_config
  from gptoss_jax.convert.export import export_hf
  from gptoss_jax.train.loop import train
  train(run_config("configs/gpt_oss.py:tiny", text_dataset, **{"train.steps": 2, "model.n_layers": 2}), tmp_path / "run")
  _, cfg, model = load_model(tmp_path / "run")
  export_hf(model, tmp_path / "hf")
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                           attn_implementation="eager").eval()
  tokens = np.random.default_rng(0).integers(0, 256, (2, 70))  # past the window of 32
  with torch.no_grad():
    want = back(torch.from_numpy(tokens)).logits.numpy()
  got = np.asarray(jax.jit(lambda m, t: m(t))(model, jnp.asarray(tokens, jnp.int32)))
  assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_export_refuses_what_hf_cannot_express(tmp_path):
  from flax import nnx
  from gptoss_jax import ModelConfig, Transformer
  from gptoss_jax.convert.hf import CheckpointError
  from gptoss_jax.convert.export import export_hf
  model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
                                  d_ff=64, attn_sinks=True), nnx.Rngs(0))  # llama has no sinks
  with pytest.raises(CheckpointError, match="attn_sinks"):
    export_hf(model, tmp_path / "x")
  assert not (tmp_path / "x").exists()


def test_original_layout_converts_to_the_same_model(mxfp4_folder, tmp_path):
  from hf_models import save_original_gpt_oss
  original = save_original_gpt_oss(mxfp4_folder, tmp_path / "original")
  for keep in (False, True):
    cfg_a, a = gptoss_jax.load_pretrained(mxfp4_folder, keep_mxfp4=keep)
    cfg_b, b = gptoss_jax.load_pretrained(original, keep_mxfp4=keep)
    # the original config.json carries no context length: the released models' 131072 is assumed
    assert cfg_a.computation() | {"max_seq_len": 0} == cfg_b.computation() | {"max_seq_len": 0}
    from flax import nnx
    for (path, x), (_, y) in zip(nnx.to_flat_state(nnx.state(a, (nnx.Param, mxfp4.Packed))),
                                 nnx.to_flat_state(nnx.state(b, (nnx.Param, mxfp4.Packed)))):
      np.testing.assert_array_equal(x[...], y[...], err_msg=str(path))


def test_chat_needs_a_harmony_checkpoint(text_dataset, tmp_path):
  from test_train import run_config
  from gptoss_jax.train.loop import train
  train(run_config("configs/gpt2.py:tiny", text_dataset, **{"train.steps": 1}), tmp_path / "run")
  out = _cli("gptoss_jax.generate", "--ckpt", tmp_path / "run", "--prompt", "hi", "--chat")
  assert out.returncode == 2 and "--chat needs a gpt-oss checkpoint" in out.stderr
  out = _cli("gptoss_jax.generate", "--ckpt", tmp_path / "run", "--prompt", "hi", "--show-reasoning")
  assert out.returncode == 2 and "--show-reasoning needs --chat" in out.stderr


def test_prefill_in_pieces_equals_the_whole_prompt_at_once():
  """gpt-oss preset (sliding window 32, sinks): a 45-token prompt fed as 32 + 8 + 4 + 1 through the KV cache
  gives the same last logits and cache as one forward pass, and the same greedy continuation."""
  from flax import nnx
  from gptoss_jax import Transformer
  from gptoss_jax.config_files import model_config_from_file
  from gptoss_jax.generate import _extend, generate, prefill_chunks
  assert prefill_chunks(45) == [32, 8, 4, 1] and prefill_chunks(600) == [256, 256, 64, 16, 8]
  assert sum(prefill_chunks(1000)) == 1000
  model = Transformer(model_config_from_file("gpt_oss:tiny").replace(n_layers=2), nnx.Rngs(3))  # a sliding layer, a full one
  model.eval()
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 45)), jnp.int32)
  whole = jax.jit(lambda m, t: m.forward(t, cache=m.init_cache(1, 64)))(model, prompt)
  cache, start = model.init_cache(1, 64), 0
  for size in prefill_chunks(45):
    logits, cache = _extend(model, prompt[:, start:start + size], jnp.asarray(start, jnp.int32), cache)
    start += size
  np.testing.assert_allclose(logits, whole.logits_BxTxV[0, -1], rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(whole.cache)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  new = generate(model, [int(t) for t in prompt[0]], 8)
  ids = [int(t) for t in prompt[0]]
  forward = jax.jit(lambda m, t: m(t))  # one full forward pass per token, padded to one length (causal)
  for _ in range(8):  # the model's own argmax
    padded = jnp.asarray([ids + [0] * (64 - len(ids))], jnp.int32)
    ids.append(int(jnp.argmax(forward(model, padded)[0, len(ids) - 1])))
  assert new == ids[45:]
