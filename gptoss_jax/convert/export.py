"""The way back: a model trained or converted here -> a Hugging Face folder (config.json + safetensors)
that transformers loads with the same logits. Tensors come from the same tables that loading reads."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from gptoss_jax.config import ConfigError, ModelConfig
from gptoss_jax.convert.hf import CheckpointError, config_from_hf, expand, rules_for
from gptoss_jax.convert.tokenizer import tokenizer_json
from gptoss_jax.fileio import atomic_folder

TOKENIZER_KEY = "gptoss_jax_tokenizer"  # config.json: the tokenizer the model was trained with (byte | gpt2 | ...)

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "gpt_oss": "GptOssForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "llama": "LlamaForCausalLM"}


def infer_family(cfg: ModelConfig) -> str:
  if not cfg.is_rotary or cfg.norm == "layernorm" or cfg.ffn == "gelu":
    return "gpt2"
  if cfg.is_moe:
    return "gpt_oss" if cfg.ffn == "clamped_swiglu" else "qwen3_moe"
  return "qwen3" if cfg.qk_norm else "llama"


def _rope(cfg: ModelConfig) -> dict:
  rope = {"rope_theta": cfg.rope_theta}
  if cfg.position == "rope":
    return rope | {"rope_type": "default"}
  if cfg.position == "yarn":
    return rope | {"rope_type": "yarn", "factor": cfg.rope_factor, "beta_fast": cfg.yarn_beta_fast,
                   "beta_slow": cfg.yarn_beta_slow, "truncate": cfg.yarn_truncate,
                   "original_max_position_embeddings": cfg.rope_original_max_len,
                   **({"attention_factor": cfg.yarn_attention_factor} if cfg.yarn_attention_factor else {})}
  if cfg.position == "llama3":
    return rope | {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.llama3_low_freq_factor,
                   "high_freq_factor": cfg.llama3_high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_original_max_len}
  raise ConfigError(f"model.position {cfg.position!r} has no rope_type in transformers' configs")


def hf_config(cfg: ModelConfig, family: str) -> dict:
  if family == "gpt2":
    return {"model_type": "gpt2", "architectures": [ARCHITECTURES[family]], "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_positions": cfg.max_seq_len,
            "n_inner": cfg.d_ff, "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
            "resid_pdrop": cfg.resid_dropout, "embd_pdrop": cfg.embed_dropout, "attn_pdrop": cfg.attn_dropout,
            "tie_word_embeddings": True}
  sliding = cfg.sliding_layers
  hf = {"model_type": family, "architectures": [ARCHITECTURES[family]], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "attention_bias": cfg.qkv_bias, "attention_dropout": cfg.attn_dropout,
        "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": _rope(cfg),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "sliding_window": cfg.sliding_window or None}
  if family == "llama":
    hf["mlp_bias"] = cfg.ffn_bias
  if family == "qwen3":
    hf["use_sliding_window"] = any(sliding)
  if family == "qwen3_moe":
    hf |= {"num_experts": cfg.n_experts, "num_experts_per_tok": cfg.top_k, "moe_intermediate_size": cfg.d_expert,
           "norm_topk_prob": cfg.norm_topk_prob, "decoder_sparse_step": 1, "mlp_only_layers": []}
  if family == "gpt_oss":
    hf |= {"num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.top_k, "intermediate_size": cfg.d_expert,
           "swiglu_limit": cfg.swiglu_limit, "swiglu_alpha": cfg.swiglu_alpha}
  return hf


def export_hf(model, dst: str | Path, family: str | None = None, tokenizer: str = "", vocab=None) -> Path:
  """Writes DST/config.json + DST/model.safetensors (float32), atomically; config.json names the
  tokenizer (TOKENIZER_KEY), which conversion reads back, and with its vocabulary at hand (`vocab`, a
  data.tokenizers.Tokenizer) DST/tokenizer.json, so that transformers tokenizes as it does."""
  cfg: ModelConfig = model.cfg
  family = family or infer_family(cfg)
  hf = hf_config(cfg, family)
  theirs, ours = config_from_hf(hf).computation(), cfg.computation()
  differ = sorted(k for k in ours if theirs.get(k) != ours[k])
  if differ:
    raise CheckpointError(f"a {family} model on Hugging Face cannot express this architecture "
                          f"(fields: {', '.join(differ)})")
  weights = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  if cfg.moe_mxfp4:  # export dequantized experts
    for i, block in enumerate(model.blocks):
      w_in, w_out = block.ffn.expert_weights(jnp.float32)
      weights[f"blocks.{i}.ffn.w_in"], weights[f"blocks.{i}.ffn.w_out"] = w_in, w_out
  tensors = {}
  for rule in expand(rules_for(family, cfg.replace(moe_mxfp4=False)), cfg.n_layers):
    arrays = rule.to_hf(*(np.asarray(weights[o], np.float32) for o in rule.ours))
    tensors.update({name: np.ascontiguousarray(a) for name, a in zip(rule.hf, arrays)})
  with atomic_folder(dst) as tmp:
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf | {"dtype": "float32"} | ({TOKENIZER_KEY: tokenizer} if tokenizer else {}),
                                                indent=2))
    if vocab is not None:
      (tmp / "tokenizer.json").write_text(json.dumps(tokenizer_json(*vocab.bpe()), ensure_ascii=False))
      (tmp / "tokenizer_config.json").write_text(json.dumps(
          {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len, "clean_up_tokenization_spaces": False}
          | ({"eos_token": vocab.encoding.decode([vocab.eot_id])} if vocab.eot_id is not None else {}), indent=2))
  return Path(dst).absolute()
