"""Tiny random Hugging Face models built offline, saved with save_pretrained (the parity references)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256)


def hf_config(family: str):
  if family == "gpt2":
    return transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4)
  if family == "gpt_oss":
    return transformers.GptOssConfig(
        **COMMON | {"num_hidden_layers": 4, "max_position_embeddings": 2048}, intermediate_size=64, num_key_value_heads=2, head_dim=16,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 64, "rope_theta": 150000.0})
  if family == "qwen3":
    return transformers.Qwen3Config(**COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                    tie_word_embeddings=False)
  if family == "qwen3_moe":
    return transformers.Qwen3MoeConfig(**COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                       num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                       norm_topk_prob=True, tie_word_embeddings=False)
  if family == "llama":
    return transformers.LlamaConfig(
        **COMMON, intermediate_size=128, num_key_value_heads=1, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32, "rope_theta": 10000.0})
  raise ValueError(family)


def build_hf_model(family: str, seed: int = 0):
  """A float32 model whose every parameter (biases, sinks and norms included) is randomized."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(hf_config(family), attn_implementation="eager",
                                                        dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(torch.randn_like(p) * (0.5 if "router" in name or "gate.weight" in name else 0.05))
  return model.eval()


def save_hf_model(family: str, folder, seed: int = 0):
  model = build_hf_model(family, seed)
  model.save_pretrained(folder)
  return model


def save_mxfp4_gpt_oss(src, dst):
  """The unquantized gpt_oss folder `src` rewritten as the hub's files are: experts as MXFP4 blocks and
  scales ([E, out, in / 32, 16] and [E, out, in / 32], made by the project's quantizer), the rest as is."""
  import json
  import shutil
  from pathlib import Path

  import numpy as np
  from safetensors.numpy import load_file, save_file

  from gptoss_jax.model import mxfp4
  src, dst = Path(src), Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  tensors = load_file(src / "model.safetensors")
  out = {}
  for name, value in tensors.items():
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
      blocks, scales = mxfp4.quantize(np.swapaxes(value, 1, 2))  # ours are [E, in, out] on disk
      out[name + "_blocks"], out[name + "_scales"] = np.asarray(blocks), np.asarray(scales)
    else:
      out[name] = value
  save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
  config = json.loads((src / "config.json").read_text())
  config["quantization_config"] = {"quant_method": "mxfp4",
                                   "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                              "model.embed_tokens", "lm_head"]}
  (dst / "config.json").write_text(json.dumps(config, indent=2))
  for extra in ("generation_config.json",):
    if (src / extra).exists():
      shutil.copy(src / extra, dst / extra)
  return dst


# OpenAI's original/ layout of gpt-oss, tensor by tensor (Hugging Face name -> original name), written
# here from the released checkpoints' names, not taken from the code under test
ORIGINAL_LAYOUT = {
    "model.embed_tokens.weight": "embedding.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "unembedding.weight",
    "model.layers.{i}.input_layernorm.weight": "block.{i}.attn.norm.scale",
    "model.layers.{i}.post_attention_layernorm.weight": "block.{i}.mlp.norm.scale",
    "model.layers.{i}.self_attn.o_proj.weight": "block.{i}.attn.out.weight",
    "model.layers.{i}.self_attn.o_proj.bias": "block.{i}.attn.out.bias",
    "model.layers.{i}.self_attn.sinks": "block.{i}.attn.sinks",
    "model.layers.{i}.mlp.router.weight": "block.{i}.mlp.gate.weight",
    "model.layers.{i}.mlp.router.bias": "block.{i}.mlp.gate.bias",
    "model.layers.{i}.mlp.experts.gate_up_proj_blocks": "block.{i}.mlp.mlp1_weight.blocks",
    "model.layers.{i}.mlp.experts.gate_up_proj_scales": "block.{i}.mlp.mlp1_weight.scales",
    "model.layers.{i}.mlp.experts.gate_up_proj_bias": "block.{i}.mlp.mlp1_bias",
    "model.layers.{i}.mlp.experts.down_proj_blocks": "block.{i}.mlp.mlp2_weight.blocks",
    "model.layers.{i}.mlp.experts.down_proj_scales": "block.{i}.mlp.mlp2_weight.scales",
    "model.layers.{i}.mlp.experts.down_proj_bias": "block.{i}.mlp.mlp2_bias",
}


def save_original_gpt_oss(mxfp4_src, dst):
  """The MXFP4 gpt_oss folder rewritten in OpenAI's original/ layout (names, fused qkv, config keys)."""
  import json
  import re
  from pathlib import Path

  import numpy as np
  from safetensors.numpy import load_file, save_file

  src, dst = Path(mxfp4_src), Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  tensors = load_file(src / "model.safetensors")
  out = {}
  for name, value in tensors.items():
    m = re.match(r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$", name)
    if m:
      i, kind = m.groups()
      parts = [tensors[f"model.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
      out[f"block.{i}.attn.qkv.{kind}"] = np.concatenate(parts, axis=0)
    elif not re.search(r"self_attn\.[kv]_proj\.", name):
      layer = re.search(r"layers\.(\d+)\.", name)
      generic = re.sub(r"layers\.\d+\.", "layers.{i}.", name)
      renamed = ORIGINAL_LAYOUT[generic]
      out[renamed.replace("{i}", layer.group(1)) if layer else renamed] = value
  save_file(out, dst / "model.safetensors")
  hf = json.loads((src / "config.json").read_text())
  rope = hf["rope_parameters"]
  original = {"num_hidden_layers": hf["num_hidden_layers"], "num_experts": hf["num_local_experts"],
              "experts_per_token": hf["num_experts_per_tok"], "vocab_size": hf["vocab_size"],
              "hidden_size": hf["hidden_size"], "intermediate_size": hf["intermediate_size"],
              "swiglu_limit": hf["swiglu_limit"], "head_dim": hf["head_dim"],
              "num_attention_heads": hf["num_attention_heads"], "num_key_value_heads": hf["num_key_value_heads"],
              "sliding_window": hf["sliding_window"], "initial_context_length": rope["original_max_position_embeddings"],
              "rope_theta": rope["rope_theta"], "rope_scaling_factor": rope["factor"],
              "rope_ntk_alpha": rope["beta_slow"], "rope_ntk_beta": rope["beta_fast"]}
  (dst / "config.json").write_text(json.dumps(original, indent=2))
  return dst
