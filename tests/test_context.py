"""Long-context evaluation: loss by position, lengths past training, evaluation-time YaRN, streaming through a
short KV cache; each against a reference written here."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import run_command
from gptoss_jax.config import DataConfig, ModelConfig, RunConfig
from gptoss_jax.config_files import load_config_file
from gptoss_jax.evaluate import evaluate_tokens, position_nll, stream_position_nll
from gptoss_jax.model import Transformer
from gptoss_jax.weights import save_model

SEQ = 40


def _model(**fields) -> Transformer:
  """gpt-oss's tiny preset (sinks, GQA, MoE, a window of 4 on alternate layers) with RoPE, larger weights so
  that attention is far from uniform."""
  cfg = ModelConfig.from_dict(load_config_file("gpt_oss:tiny").model).replace(
      position="rope", sliding_window=4, init_std=0.2, **fields)
  model = Transformer(cfg, nnx.Rngs(3))
  model.eval()
  return model


def _direct_nll(model, windows):
  """Each position's loss from the model's whole logits, log-softmax in float64 here."""
  logits = np.asarray(model(jnp.asarray(windows[:, :-1])), np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return logz - np.take_along_axis(logits, windows[:, 1:, None], -1)[..., 0]


def test_loss_by_position_buckets_equal_per_token_losses_computed_directly():
  model = _model()
  tokens = np.random.default_rng(0).integers(0, 256, 3 * 24 + 5)
  result = evaluate_tokens(model, tokens, 24, 2, np.ones(256, np.int64), progress=False)
  windows = np.stack([tokens[i * 24:i * 24 + 25] for i in range(3)]).astype(np.int32)
  nll = _direct_nll(model, windows)
  ranges = [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 24)]  # powers of two, the last cut at 24
  assert [(b["from"], b["to"]) for b in result["by_position"]] == ranges
  for bucket, (a, b) in zip(result["by_position"], ranges):
    assert bucket["loss"] == pytest.approx(nll[:, a:b].mean(), rel=1e-5)
  assert result["loss"] == pytest.approx(nll.mean(), rel=1e-5) and result["tokens"] == 72


def test_streaming_with_a_long_cache_is_the_forward_pass():
  model = _model()
  windows = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, SEQ + 1)), jnp.int32)
  np.testing.assert_allclose(stream_position_nll(model, windows, SEQ), position_nll(model, windows), atol=2e-5)


@pytest.mark.parametrize("cache", [3, 6])
def test_streaming_with_a_short_cache_masks_each_query_to_its_last_n_keys(cache):
  """The reference: the whole window in one forward pass with every layer's window set to the cache (a
  sliding layer keeps its own where smaller), so query p sees keys p - N + 1 .. p."""
  model = _model()
  windows = np.random.default_rng(2).integers(0, 256, (2, SEQ + 1)).astype(np.int32)
  streamed = np.asarray(stream_position_nll(model, jnp.asarray(windows), cache))
  full = _direct_nll(model, windows)
  for block in model.blocks:
    block.attn.window = min(block.attn.window, cache) if block.attn.window else cache
  masked = _direct_nll(model, windows)
  np.testing.assert_allclose(streamed, masked, atol=2e-5)
  assert np.abs(streamed[:, cache:] - full[:, cache:]).max() > 1e-3  # the short cache does lose context
  np.testing.assert_allclose(streamed[:, :cache], full[:, :cache], atol=2e-5)  # and nothing before it is full


def _cli(*args):
  from gptoss_jax.evaluate import main
  return run_command(main, *args)


@pytest.fixture(scope="module")
def rope_checkpoint(tmp_path_factory, text_dataset):
  """A rotary model saved as a conversion is (random weights), its training length 16."""
  model = _model(max_seq_len=64)
  config = RunConfig(model=model.cfg, data=DataConfig(seq_len=16))
  return save_model(tmp_path_factory.mktemp("rope") / "ckpt", config, model)


def test_lengths_yarn_at_evaluation_and_refusals_on_the_command_line(rope_checkpoint, text_dataset, tmp_path):
  plain = _cli("--ckpt", rope_checkpoint, "--dataset", text_dataset, "--seq-len", 16, "--json")
  assert plain.returncode == 0, plain.stderr
  plot = tmp_path / "by_position.png"
  lengths = _cli("--ckpt", rope_checkpoint, "--dataset", text_dataset, "--lengths", "16,128", "--json", "--plot", plot)
  assert lengths.returncode == 0, lengths.stderr
  by_length = json.loads(lengths.stdout)["lengths"]
  assert by_length["16"] == json.loads(plain.stdout)  # --lengths at the training length is --seq-len's result
  assert by_length["128"]["seq_len"] == 128 and plot.read_bytes()[:4] == b"\x89PNG"  # past max_seq_len (64): rotary

  def yarn(factor):
    out = _cli("--ckpt", rope_checkpoint, "--dataset", text_dataset, "--lengths", "16,128", "--json",
               "--config.model.position=yarn", f"--config.model.rope_factor={factor}")
    assert out.returncode == 0, out.stderr
    assert "rope_original_max_len = 16" in out.stderr  # YaRN scales from the training length
    return json.loads(out.stdout)["lengths"]

  assert yarn(1.0) == by_length  # YaRN at factor 1 is plain RoPE
  assert yarn(8.0)["128"]["loss"] != by_length["128"]["loss"]

  for args, message in [(("--config.model.n_layers=3",), "would change the weights' shapes"),
                        (("--config.train.steps=3",), "only model fields"),
                        (("--stream",), "--stream and --cache"),
                        (("--lengths", "16,x"), "--lengths")]:
    out = _cli("--ckpt", rope_checkpoint, "--dataset", text_dataset, *args)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_learned_positions_are_refused_past_their_table(tmp_path, text_dataset):
  cfg = ModelConfig.from_dict(load_config_file("gpt2:tiny").model).replace(max_seq_len=32)
  folder = save_model(tmp_path / "ckpt", RunConfig(model=cfg, data=DataConfig(seq_len=16)), Transformer(cfg, nnx.Rngs(0)))
  out = _cli("--ckpt", folder, "--dataset", text_dataset, "--lengths", "32,64")
  assert out.returncode == 2 and "learned positions stop at model.max_seq_len = 32" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1
  out = _cli("--ckpt", folder, "--dataset", text_dataset, "--seq-len", 32, "--stream", "--cache", 8, "--json")
  assert out.returncode == 0 and json.loads(out.stdout)["stream_cache"] == 8, out.stderr
  out = _cli("--ckpt", folder, "--dataset", text_dataset, "--config.model.position=yarn")  # no rotation to scale
  assert out.returncode == 2 and "trained with learned positions" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1


def test_the_context_sweeps_evaluation_of_a_training(tmp_path, text_dataset):
  """experiments.context on a saved rotary model: each length, YaRN from the training length, streamed."""
  from experiments.context import measure
  from gptoss_jax.data.pipeline import split_tokens
  from gptoss_jax.model.positions import rope_frequencies
  model = _model(max_seq_len=64)
  folder = save_model(tmp_path / "ckpt", RunConfig(model=model.cfg, data=DataConfig(seq_len=8, dir=str(text_dataset))),
                      model)
  result = measure(folder, multiples=(1, 4))
  tokens = split_tokens(text_dataset, "test")

  def direct(m, n: int) -> float:  # the mean next-token loss over non-overlapping windows of n + 1 tokens
    k = (len(tokens) - 1) // n
    return float(np.mean(_direct_nll(m, np.stack([tokens[i * n:i * n + n + 1] for i in range(k)]).astype(np.int32))))

  assert result["plain"]["8"]["loss"] == pytest.approx(direct(model, 8), rel=1e-5)
  assert result["plain"]["32"]["loss"] == pytest.approx(direct(model, 32), rel=1e-5)
  yarn = model.cfg.replace(position="yarn", rope_factor=4.0, rope_original_max_len=8)
  scaled = Transformer(yarn, nnx.Rngs(0))
  nnx.update(scaled, nnx.state(model))
  assert result["yarn"]["32"]["loss"] == pytest.approx(direct(scaled, 32), rel=1e-5)
  assert list(result["yarn"]) == ["32"] and rope_frequencies(yarn)[1] > 1  # YaRN's attention scale is on
  for block in model.blocks:  # streamed through a cache of the training length, 8: each query sees its last 8 keys
    block.attn.window = min(block.attn.window, 8) if block.attn.window else 8
  assert result["stream"]["stream_cache"] == 8
  assert result["stream"]["loss"] == pytest.approx(direct(model, 32), rel=1e-5)
  assert result["stream"]["loss"] != pytest.approx(result["plain"]["32"]["loss"], rel=1e-4)  # the cache matters


def test_evaluations_default_window_is_capped_on_cpu_only(monkeypatch, capsys):
  """A conversion's 4,096-token default took 16.0 GiB at gpt-oss-20b's 24 layers on CPU (1,024: 14.4; 512: 13.9):
  capped at CPU_WINDOW there."""
  import jax
  from gptoss_jax import evaluate
  conversion, training = (RunConfig(model=ModelConfig(max_seq_len=8192), data=DataConfig(seq_len=n)) for n in (4096, 128))
  assert evaluate.default_seq_len(conversion) == evaluate.CPU_WINDOW == 512 and "windows of 512" in capsys.readouterr().err
  assert evaluate.default_seq_len(training) == 128
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert evaluate.default_seq_len(conversion) == 4096
