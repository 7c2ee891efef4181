"""load_pretrained against Hugging Face transformers on tiny random models, and its error messages."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gptoss_jax
from gptoss_jax.convert.hf import CheckpointError

FAMILIES = ["gpt2", "gpt_oss", "qwen3", "qwen3_moe", "llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(hf_folder, family):
  folder, ref = hf_folder(family)
  cfg, model = gptoss_jax.load_pretrained(folder, dtype="float32")
  T = 40 if family != "gpt2" else 32  # gpt_oss: longer than its window of 8, over sliding and full layers
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, T))
  with torch.no_grad():
    want = ref(torch.from_numpy(tokens)).logits.numpy()
  got = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
  assert got.shape == (2, T, cfg.vocab_size)
  assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_gpt_oss_config_is_read(hf_folder):
  folder, _ = hf_folder("gpt_oss")
  cfg, _ = gptoss_jax.load_pretrained(folder)
  assert cfg.sliding_layers == (True, False, True, False) and cfg.sliding_window == 8
  assert (cfg.position, cfg.rope_factor, cfg.yarn_truncate, cfg.ffn) == ("yarn", 32.0, False, "clamped_swiglu")
  assert cfg.attn_sinks and cfg.router_bias and cfg.n_experts == 4 and cfg.top_k == 2


def test_bfloat16_load(hf_folder):
  folder, _ = hf_folder("qwen3")
  cfg, model = gptoss_jax.load_pretrained(folder, dtype="bfloat16")
  assert model.embed[...].dtype == jnp.bfloat16 and cfg.dtype == "bfloat16"
  assert np.isfinite(np.asarray(model(jnp.zeros((1, 4), jnp.int32)))).all()


def _copy(hf_folder, family, tmp_path):
  folder, _ = hf_folder(family)
  dst = tmp_path / family
  shutil.copytree(folder, dst)
  return dst


def test_no_config(tmp_path):
  with pytest.raises(CheckpointError, match="no config.json"):
    gptoss_jax.load_pretrained(tmp_path)


def _with_config(folder, **changes):
  """Rewrites the folder's config.json with `changes`; returns the folder."""
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps(config | changes))
  return folder


def test_unknown_model_type(hf_folder, tmp_path):
  dst = _with_config(_copy(hf_folder, "llama", tmp_path), model_type="bert")
  with pytest.raises(CheckpointError, match="'bert' is not supported"):
    gptoss_jax.load_pretrained(dst)


def test_truncated_safetensors(hf_folder, tmp_path):
  dst = _copy(hf_folder, "llama", tmp_path)
  data = (dst / "model.safetensors").read_bytes()
  (dst / "model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match="model.safetensors"):
    gptoss_jax.load_pretrained(dst)


def test_checkpoint_of_another_shape(hf_folder, tmp_path):
  dst = _with_config(_copy(hf_folder, "qwen3", tmp_path), intermediate_size=96)
  with pytest.raises(CheckpointError, match="gate_proj.weight.*shape"):
    gptoss_jax.load_pretrained(dst)


def test_missing_and_unexpected_tensors_are_listed(hf_folder, tmp_path):
  dst = _with_config(_copy(hf_folder, "qwen3", tmp_path), num_hidden_layers=3)
  with pytest.raises(CheckpointError, match="missing.*model.layers.2.mlp.down_proj.weight"):
    gptoss_jax.load_pretrained(dst)
  _with_config(dst, num_hidden_layers=1)
  with pytest.raises(CheckpointError, match="unexpected.*model.layers.1"):
    gptoss_jax.load_pretrained(dst)
