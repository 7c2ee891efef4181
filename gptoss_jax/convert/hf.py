"""Hugging Face checkpoints -> ModelConfig + Transformer.

Each family is a table of rules: one of our parameter paths, the Hugging Face tensors it is made of,
and the function that builds it from them (torch Linear weights are [out, in]; ours are [in, ...]).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from gptoss_jax.config import ConfigError, ModelConfig
from gptoss_jax.model import WEIGHTS, Transformer, fresh_rest, mxfp4, rngs
from gptoss_jax.weights import aligned_empty

FAMILIES = ("gpt2", "gpt_oss", "qwen3", "qwen3_moe", "llama")


class CheckpointError(ValueError):
  """A checkpoint that cannot be read into a model; the message names what is wrong."""


# ---------------------------------------------------------------- config.json -> ModelConfig


def read_hf_config(folder: str | Path) -> dict:
  """config.json as a Hugging Face config; OpenAI's original/ gpt-oss config is translated."""
  path = Path(folder) / "config.json"
  if not path.is_file():
    raise CheckpointError(f"{folder}: no config.json")
  hf = json.loads(path.read_text())
  return original_to_hf_config(hf) if is_original(hf) else hf


def is_original(hf: dict) -> bool:
  """OpenAI's own gpt-oss layout (the `original/` folder of the released checkpoints)."""
  return "model_type" not in hf and "rope_ntk_beta" in hf


def original_to_hf_config(o: dict) -> dict:
  n_layers = o["num_hidden_layers"]
  return {
      "model_type": "gpt_oss", "original_layout": True, "num_hidden_layers": n_layers,
      "num_local_experts": o["num_experts"], "num_experts_per_tok": o.get("experts_per_token", 4),
      "vocab_size": o["vocab_size"], "hidden_size": o["hidden_size"], "intermediate_size": o["intermediate_size"],
      "swiglu_limit": o.get("swiglu_limit", 7.0), "head_dim": o["head_dim"],
      "num_attention_heads": o["num_attention_heads"], "num_key_value_heads": o["num_key_value_heads"],
      "sliding_window": o["sliding_window"], "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
      "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)],
      "rope_parameters": {"rope_type": "yarn", "rope_theta": o["rope_theta"], "factor": o["rope_scaling_factor"],
                          "beta_fast": o["rope_ntk_beta"], "beta_slow": o["rope_ntk_alpha"], "truncate": False,
                          "original_max_position_embeddings": o.get("initial_context_length", 4096)},
      "tie_word_embeddings": False, "attention_bias": True,
      "quantization_config": {"quant_method": "mxfp4"},
  }


def _rope_fields(hf: dict) -> dict:
  rp = dict(hf.get("rope_scaling") or {})
  rp.update(hf.get("rope_parameters") or {})
  theta = rp.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = rp.get("rope_type", rp.get("type", "default"))
  fields = {"rope_theta": float(theta)}
  if kind == "default":
    return fields | {"position": "rope"}
  if kind == "yarn":
    if rp.get("mscale") or rp.get("mscale_all_dim"):
      raise CheckpointError("YaRN with mscale / mscale_all_dim is not supported")
    return fields | {
        "position": "yarn", "rope_factor": float(rp["factor"]),
        "rope_original_max_len": int(rp["original_max_position_embeddings"]),
        "yarn_beta_fast": float(rp.get("beta_fast") or 32.0), "yarn_beta_slow": float(rp.get("beta_slow") or 1.0),
        "yarn_truncate": bool(rp.get("truncate", True)),
        "yarn_attention_factor": float(rp.get("attention_factor") or 0.0),
    }
  if kind == "llama3":
    return fields | {
        "position": "llama3", "rope_factor": float(rp["factor"]),
        "rope_original_max_len": int(rp["original_max_position_embeddings"]),
        "llama3_low_freq_factor": float(rp["low_freq_factor"]),
        "llama3_high_freq_factor": float(rp["high_freq_factor"]),
    }
  raise CheckpointError(f"rope type {kind!r} is not supported (default, yarn, llama3)")


def _window_fields(hf: dict) -> dict:
  types = hf.get("layer_types")
  window = hf.get("sliding_window") or 0
  if not types or not window or "sliding_attention" not in types:
    return {"sliding_window": 0}
  sliding = [str(i) for i, t in enumerate(types) if t == "sliding_attention"]
  return {"sliding_window": int(window), "window_layers": ",".join(sliding)}


def config_from_hf(hf: dict, dtype: str = "float32") -> ModelConfig:
  kind = hf.get("model_type")
  # evaluation first: no balancing losses unless a fine-tuning run asks for them
  common = {"param_dtype": dtype, "dtype": dtype, "moe_aux_loss_weight": 0.0, "moe_z_loss_weight": 0.0}
  if kind == "gpt2":
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
      raise CheckpointError(f"gpt2 activation {hf['activation_function']!r} is not supported")
    d = hf["n_embd"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
        n_kv_heads=hf["n_head"], head_dim=d // hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
        max_seq_len=hf["n_positions"], embed_dropout=hf.get("embd_pdrop", 0.0),
        attn_dropout=hf.get("attn_pdrop", 0.0), resid_dropout=hf.get("resid_pdrop", 0.0),
        norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), position="learned",
        ffn="gelu", ffn_bias=True, qkv_bias=True, out_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), **common)
  if kind not in FAMILIES:
    raise CheckpointError(f"model type {kind!r} is not supported ({', '.join(FAMILIES)})")
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{kind} activation {hf['hidden_act']!r} is not supported (silu)")
  n_heads = hf["num_attention_heads"]
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, d_ff=hf["intermediate_size"],
      max_seq_len=hf["max_position_embeddings"], attn_dropout=float(hf.get("attention_dropout", 0.0)),
      norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), ffn="swiglu",
      qkv_bias=bool(hf.get("attention_bias", False)), out_bias=bool(hf.get("attention_bias", False)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      **_rope_fields(hf), **_window_fields(hf), **common)
  if kind == "llama":
    fields["ffn_bias"] = bool(hf.get("mlp_bias", False))
  if kind in ("qwen3", "qwen3_moe"):
    fields["qk_norm"] = True
  if kind == "qwen3_moe":
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
      raise CheckpointError("qwen3_moe with dense layers (mlp_only_layers, decoder_sparse_step) is not supported")
    fields.update(n_experts=hf.get("num_experts") or hf["num_local_experts"], top_k=hf["num_experts_per_tok"], d_expert=hf["moe_intermediate_size"],
                  routing="softmax_topk", norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
  if kind == "gpt_oss":
    fields.update(n_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"], d_expert=hf["intermediate_size"],
                  routing="topk_softmax", router_bias=True, ffn="clamped_swiglu", ffn_bias=True,
                  swiglu_limit=float(hf.get("swiglu_limit", 7.0)), swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
                  attn_sinks=True, norm_eps=hf.get("rms_norm_eps", 1e-5))
  if fields.get("top_k") == 1 and (kind == "gpt_oss" or fields["norm_topk_prob"]):
    raise CheckpointError(f"{kind} with one expert per token gives that expert a weight of 1; this codebase "
                          "uses Switch's gate (its softmax probability) at top_k = 1, so it would compute "
                          "something else")
  try:
    return ModelConfig(**fields)
  except ConfigError as e:
    raise CheckpointError(f"config.json does not make a valid model: {e}") from e


# ---------------------------------------------------------------- tensor tables


@dataclass(frozen=True)
class Rule:
  """Our parameters <-> the Hugging Face tensors they are made of ('{i}' stands for the layer).
  to_ours reads the table one way (loading), to_hf the other (export), so the two cannot drift."""
  ours: tuple[str, ...]
  hf: tuple[str, ...]
  to_ours: Callable[..., tuple[np.ndarray, ...]]
  to_hf: Callable[..., tuple[np.ndarray, ...]] | None = None  # None: import only (MXFP4 sources)


def _one(ours: str, hf: str, to_ours=lambda x: x, to_hf=lambda x: x) -> Rule:
  return Rule((ours,), (hf,), lambda x: (to_ours(x),), lambda x: (to_hf(x),))


def _interleave(x):  # [..., 2, F] -> [..., 2F] with gate at even and up at odd
  return np.swapaxes(x, -1, -2).reshape(*x.shape[:-2], -1)


def _deinterleave(x):  # [..., 2F] with gate at even and up at odd -> [..., 2, F]
  return np.swapaxes(x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2), -1, -2)


def _deinterleave_rows(x):  # packed [E, 2F, ...] rows (gate at even, up at odd) -> [E, 2, F, ...]
  return np.swapaxes(x.reshape(x.shape[0], x.shape[1] // 2, 2, *x.shape[2:]), 1, 2)


def _norm_rules(cfg: ModelConfig, ours: str, hf: str) -> list[Rule]:
  rules = [_one(f"{ours}.scale", f"{hf}.weight")]
  if cfg.norm == "layernorm":
    rules.append(_one(f"{ours}.bias", f"{hf}.bias"))
  return rules


def gpt2_rules(cfg: ModelConfig) -> list[Rule]:
  D, N, H, L = cfg.d_model, cfg.n_heads, cfg.head_dim, "transformer.h.{i}"
  A = "blocks.{i}.attn"
  split = lambda w: tuple(w[..., j * D:(j + 1) * D].reshape(*w.shape[:-1], N, H) for j in range(3))
  fuse = lambda *xs: np.concatenate([x.reshape(*x.shape[:-2], D) for x in xs], axis=-1)
  rules = [_one("embed", "transformer.wte.weight"),
           _one("pos_embed.table", "transformer.wpe.weight"),
           *_norm_rules(cfg, "final_norm", "transformer.ln_f"),
           *_norm_rules(cfg, "blocks.{i}.attn_norm", f"{L}.ln_1"),
           *_norm_rules(cfg, "blocks.{i}.ffn_norm", f"{L}.ln_2"),
           Rule((f"{A}.wq", f"{A}.wk", f"{A}.wv"), (f"{L}.attn.c_attn.weight",), split, lambda *x: (fuse(*x),)),
           Rule((f"{A}.bq", f"{A}.bk", f"{A}.bv"), (f"{L}.attn.c_attn.bias",), split, lambda *x: (fuse(*x),)),
           _one(f"{A}.wo", f"{L}.attn.c_proj.weight", lambda w: w.reshape(N, H, D), lambda a: a.reshape(N * H, D)),
           _one(f"{A}.bo", f"{L}.attn.c_proj.bias"),
           _one("blocks.{i}.ffn.w_in", f"{L}.mlp.c_fc.weight", lambda w: w[:, None, :], lambda a: a[:, 0, :]),
           _one("blocks.{i}.ffn.b_in", f"{L}.mlp.c_fc.bias", lambda b: b[None, :], lambda a: a[0]),
           _one("blocks.{i}.ffn.w_out", f"{L}.mlp.c_proj.weight"),
           _one("blocks.{i}.ffn.b_out", f"{L}.mlp.c_proj.bias")]
  if not cfg.tie_embeddings:
    rules.append(_one("unembed", "lm_head.weight", lambda w: w.T, lambda a: a.T))
  return rules


def llama_like_rules(cfg: ModelConfig, family: str, mxfp4_source: bool = False) -> list[Rule]:
  """llama, qwen3, qwen3_moe and gpt_oss share the attention and norm layout."""
  D, N, K, H, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, "model.layers.{i}"
  A, O = f"{L}.self_attn", "blocks.{i}.attn"
  proj_in = lambda ours, hf, heads: _one(ours, hf, lambda w: w.T.reshape(D, heads, H),
                                         lambda a: a.reshape(D, heads * H).T)
  rules = [_one("embed", "model.embed_tokens.weight"),
           *_norm_rules(cfg, "final_norm", "model.norm"),
           *_norm_rules(cfg, "blocks.{i}.attn_norm", f"{L}.input_layernorm"),
           *_norm_rules(cfg, "blocks.{i}.ffn_norm", f"{L}.post_attention_layernorm"),
           proj_in(f"{O}.wq", f"{A}.q_proj.weight", N),
           proj_in(f"{O}.wk", f"{A}.k_proj.weight", K),
           proj_in(f"{O}.wv", f"{A}.v_proj.weight", K),
           _one(f"{O}.wo", f"{A}.o_proj.weight", lambda w: w.T.reshape(N, H, D), lambda a: a.reshape(N * H, D).T)]
  if not cfg.tie_embeddings:
    rules.append(_one("unembed", "lm_head.weight", lambda w: w.T, lambda a: a.T))
  if cfg.qkv_bias:
    for name, heads in (("q", N), ("k", K), ("v", K)):
      rules.append(_one(f"{O}.b{name}", f"{A}.{name}_proj.bias", lambda b, h=heads: b.reshape(h, H),
                        lambda a: a.reshape(-1)))
  if cfg.out_bias:
    rules.append(_one(f"{O}.bo", f"{A}.o_proj.bias"))
  if cfg.qk_norm:
    rules += [_one(f"{O}.q_norm.scale", f"{A}.q_norm.weight"), _one(f"{O}.k_norm.scale", f"{A}.k_norm.weight")]
  if cfg.attn_sinks:
    rules.append(_one(f"{O}.sinks", f"{A}.sinks"))
  return rules + _ffn_rules(cfg, family, mxfp4_source)


def _ffn_rules(cfg: ModelConfig, family: str, mxfp4_source: bool) -> list[Rule]:
  """The feed-forward layer's tensors: a gated MLP (llama, qwen3), one tensor pair per expert (qwen3_moe),
  or gpt_oss's stacked experts (kept packed, dequantized or plain)."""
  L, rules = "model.layers.{i}", []
  M, F = f"{L}.mlp", "blocks.{i}.ffn"
  glu_in = lambda g, u: np.stack([g.T, u.T], axis=1)  # two [F, D] torch weights -> [D, 2, F]
  if family in ("llama", "qwen3"):
    rules += [Rule((f"{F}.w_in",), (f"{M}.gate_proj.weight", f"{M}.up_proj.weight"),
                   lambda g, u: (glu_in(g, u),), lambda a: (a[:, 0].T, a[:, 1].T)),
              _one(f"{F}.w_out", f"{M}.down_proj.weight", lambda w: w.T, lambda a: a.T)]
    if cfg.ffn_bias:
      rules += [Rule((f"{F}.b_in",), (f"{M}.gate_proj.bias", f"{M}.up_proj.bias"),
                     lambda g, u: (np.stack([g, u]),), lambda a: (a[0], a[1])),
                _one(f"{F}.b_out", f"{M}.down_proj.bias")]
  elif family == "qwen3_moe":
    E = cfg.n_experts
    names = lambda proj: tuple(f"{M}.experts.{e}.{proj}.weight" for e in range(E))
    rules += [_one(f"{F}.router_w", f"{M}.gate.weight", lambda w: w.T, lambda a: a.T),
              Rule((f"{F}.w_in",), names("gate_proj") + names("up_proj"),
                   lambda *w: (np.stack([glu_in(g, u) for g, u in zip(w[:E], w[E:])]),),
                   lambda a: tuple(a[e, :, 0].T for e in range(E)) + tuple(a[e, :, 1].T for e in range(E))),
              Rule((f"{F}.w_out",), names("down_proj"), lambda *w: (np.stack([x.T for x in w]),),
                   lambda a: tuple(a[e].T for e in range(E)))]
  elif family == "gpt_oss":
    X = f"{M}.experts"
    rules += [_one(f"{F}.router_w", f"{M}.router.weight", lambda w: w.T, lambda a: a.T),
              _one(f"{F}.router_b", f"{M}.router.bias"),
              _one(f"{F}.b_in", f"{X}.gate_up_proj_bias", _deinterleave, _interleave),
              _one(f"{F}.b_out", f"{X}.down_proj_bias")]
    if mxfp4_source and cfg.moe_mxfp4:  # stay packed: only the interleaved gate/up rows are reordered
      rules += [Rule((f"{F}.w_in_blocks",), (f"{X}.gate_up_proj_blocks",), lambda b: (_deinterleave_rows(b),)),
                Rule((f"{F}.w_in_scales",), (f"{X}.gate_up_proj_scales",), lambda s: (_deinterleave_rows(s),)),
                Rule((f"{F}.w_out_blocks",), (f"{X}.down_proj_blocks",), lambda b: (b,)),
                Rule((f"{F}.w_out_scales",), (f"{X}.down_proj_scales",), lambda s: (s,))]
    elif mxfp4_source:  # dequantize: [E, out, in] -> ours
      unpack = lambda b, s: np.asarray(mxfp4.dequantize(b, s, jnp.float32)).swapaxes(1, 2)
      rules += [Rule((f"{F}.w_in",), (f"{X}.gate_up_proj_blocks", f"{X}.gate_up_proj_scales"),
                     lambda b, s: (_deinterleave(unpack(b, s)),)),
                Rule((f"{F}.w_out",), (f"{X}.down_proj_blocks", f"{X}.down_proj_scales"),
                     lambda b, s: (unpack(b, s),))]
    else:
      rules += [_one(f"{F}.w_in", f"{X}.gate_up_proj", _deinterleave, _interleave),
                _one(f"{F}.w_out", f"{X}.down_proj")]
  return rules


ORIGINAL_NAMES = [  # Hugging Face gpt_oss name -> OpenAI original/ name
    (r"^model\.embed_tokens\.weight$", "embedding.weight"),
    (r"^lm_head\.weight$", "unembedding.weight"),
    (r"^model\.norm\.weight$", "norm.scale"),
    (r"^model\.layers\.(\{i\})\.input_layernorm\.weight$", r"block.\1.attn.norm.scale"),
    (r"^model\.layers\.(\{i\})\.post_attention_layernorm\.weight$", r"block.\1.mlp.norm.scale"),
    (r"^model\.layers\.(\{i\})\.self_attn\.o_proj\.", r"block.\1.attn.out."),
    (r"^model\.layers\.(\{i\})\.self_attn\.sinks$", r"block.\1.attn.sinks"),
    (r"^model\.layers\.(\{i\})\.mlp\.router\.", r"block.\1.mlp.gate."),
    (r"^model\.layers\.(\{i\})\.mlp\.experts\.gate_up_proj_(blocks|scales)$", r"block.\1.mlp.mlp1_weight.\2"),
    (r"^model\.layers\.(\{i\})\.mlp\.experts\.gate_up_proj_bias$", r"block.\1.mlp.mlp1_bias"),
    (r"^model\.layers\.(\{i\})\.mlp\.experts\.down_proj_(blocks|scales)$", r"block.\1.mlp.mlp2_weight.\2"),
    (r"^model\.layers\.(\{i\})\.mlp\.experts\.down_proj_bias$", r"block.\1.mlp.mlp2_bias"),
]


def _original_name(hf_name: str) -> str:
  for pattern, replacement in ORIGINAL_NAMES:
    renamed, n = re.subn(pattern, replacement, hf_name)
    if n:
      return renamed
  raise KeyError(hf_name)


def original_rules(cfg: ModelConfig) -> list[Rule]:
  """gpt_oss rules renamed to the original layout, with q, k and v fused in one `qkv` tensor."""
  D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  O, A = "blocks.{i}.attn", "block.{i}.attn"
  rows = (N * H, K * H, K * H)
  cut = lambda x: np.split(x, np.cumsum(rows)[:2], axis=0)
  rules = [Rule(r.ours, tuple(_original_name(h) for h in r.hf), r.to_ours, r.to_hf)
           for r in llama_like_rules(cfg, "gpt_oss", mxfp4_source=True)
           if not any(o.endswith((".wq", ".wk", ".wv", ".bq", ".bk", ".bv")) for o in r.ours)]
  heads = (N, K, K)
  rules += [Rule((f"{O}.wq", f"{O}.wk", f"{O}.wv"), (f"{A}.qkv.weight",),
                 lambda w: tuple(x.T.reshape(D, h, H) for x, h in zip(cut(w), heads))),
            Rule((f"{O}.bq", f"{O}.bk", f"{O}.bv"), (f"{A}.qkv.bias",),
                 lambda b: tuple(x.reshape(h, H) for x, h in zip(cut(b), heads)))]
  return rules


def rules_for(family: str, cfg: ModelConfig, mxfp4_source: bool = False, original: bool = False) -> list[Rule]:
  if original:
    return original_rules(cfg)
  return gpt2_rules(cfg) if family == "gpt2" else llama_like_rules(cfg, family, mxfp4_source)


def expand(rules: list[Rule], n_layers: int) -> Iterator[Rule]:
  for rule in rules:
    if any("{i}" in name for name in rule.ours):
      for i in range(n_layers):
        yield Rule(tuple(o.format(i=i) for o in rule.ours), tuple(h.format(i=i) for h in rule.hf),
                   rule.to_ours, rule.to_hf)
    else:
      yield rule


# ---------------------------------------------------------------- safetensors


# safetensors dtype names -> numpy dtypes (ml_dtypes for the ones numpy lacks)
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
                      "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
                      "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
  """One .safetensors file (8-byte header length, JSON header, data), read tensor by tensor with plain reads
  into fresh, aligned host memory: nothing memory-mapped stays resident, so reading a folder of tens of GB
  holds one tensor at a time."""

  def __init__(self, path: Path):
    self.path = path
    try:
      with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100 * 2**20:
          raise ValueError(f"header of {length} bytes")
        header = json.loads(f.read(length))
      header.pop("__metadata__", None)
      self.start, size = 8 + length, path.stat().st_size
      self.tensors = {name: (SAFETENSORS_DTYPES[t["dtype"]], tuple(t["shape"]), *t["data_offsets"])
                      for name, t in header.items()}
    except Exception as e:  # a truncated, corrupt or foreign file
      raise CheckpointError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from None
    end = max((t[3] for t in self.tensors.values()), default=0)
    if self.start + end > size:
      raise CheckpointError(f"{path}: truncated safetensors file ({size:,} bytes, its header needs "
                            f"{self.start + end:,})")

  def get(self, name: str) -> np.ndarray:
    dtype, shape, begin, end = self.tensors[name]
    out = aligned_empty(shape, dtype)
    if out.nbytes != end - begin:
      raise CheckpointError(f"{self.path}: tensor {name} has {end - begin} bytes for shape {shape} of {dtype}")
    view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
    with open(self.path, "rb", buffering=0) as f:
      while done < out.nbytes:
        n = os.preadv(f.fileno(), [view[done:]], self.start + begin + done)
        if n <= 0:
          raise CheckpointError(f"{self.path}: tensor {name} ends early")
        done += n
    return out


class SafetensorsFolder:
  """Tensor name -> file for a folder with one or more *.safetensors files (index optional)."""

  def __init__(self, folder: str | Path):
    self.folder = Path(folder)
    self._files: dict[Path, SafetensorsFile] = {}
    index = self.folder / "model.safetensors.index.json"
    if index.is_file():
      weight_map = json.loads(index.read_text())["weight_map"]
      self.files = {name: self.folder / f for name, f in weight_map.items()}
    else:
      self.files = {name: f for f in sorted(self.folder.glob("*.safetensors")) for name in self._open(f).tensors}
    if not self.files:
      raise CheckpointError(f"{folder}: no *.safetensors files")

  def _open(self, path: Path) -> SafetensorsFile:
    if path not in self._files:
      if not path.is_file():
        raise CheckpointError(f"{path}: no such file (named by the index)")
      self._files[path] = SafetensorsFile(path)
    return self._files[path]

  def names(self) -> set[str]:
    return set(self.files)

  def get(self, name: str) -> np.ndarray:
    file = self._open(self.files[name])
    if name not in file.tensors:
      raise CheckpointError(f"{file.path}: no tensor {name} (the index says it is there)")
    return file.get(name)


# ---------------------------------------------------------------- loading


def _path_str(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def is_mxfp4(hf: dict) -> bool:
  return (hf.get("quantization_config") or {}).get("quant_method") == "mxfp4"


def read_weights(path: str | Path, dtype: str = "float32", keep_mxfp4: bool = False
                 ) -> tuple[ModelConfig, Iterator[tuple[str, jax.Array]]]:
  """A Hugging Face folder (config.json + safetensors) -> (config, its weights as they are read: (our name
  joined by dots, array) pairs). Everything that can be checked before reading is (the config, missing and
  unexpected tensors); a tensor of the wrong shape raises while reading. Tensors are read one at a time
  (memory-mapped). MXFP4 experts (gpt_oss with a quantization_config) are dequantized, or with keep_mxfp4
  kept packed."""
  hf = read_hf_config(path)
  cfg = config_from_hf(hf, dtype)
  packed_source = is_mxfp4(hf)
  if keep_mxfp4:
    if not packed_source:
      raise CheckpointError(f"{path}: --keep-mxfp4 needs an MXFP4 checkpoint (a quantization_config "
                            "with quant_method mxfp4)")
    cfg = cfg.replace(moe_mxfp4=True)
  tensors = SafetensorsFolder(path)
  family = hf["model_type"]
  _, abstract, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs())), WEIGHTS, ...)
  wanted = {_path_str(p): v for p, v in nnx.to_flat_state(abstract)}
  rules = list(expand(rules_for(family, cfg, packed_source, hf.get("original_layout", False)), cfg.n_layers))
  required = {h for r in rules for h in r.hf}
  optional = {"lm_head.weight"} if cfg.tie_embeddings else set()
  if family == "gpt2":  # non-persistent causal-mask buffers that older files carry
    optional |= {n for n in tensors.names() if n.endswith((".attn.bias", ".attn.masked_bias"))}
  missing = sorted(required - tensors.names())
  unexpected = sorted(tensors.names() - required - optional)
  if missing or unexpected:
    raise CheckpointError(f"{path}: tensors do not match a {family} model: "
                          f"missing {missing[:20] or 'none'}, unexpected {unexpected[:20] or 'none'}")
  not_covered = sorted(set(wanted) - {o for r in rules for o in r.ours})
  if not_covered:
    raise CheckpointError(f"internal: no rule fills {not_covered}")

  def arrays():
    for rule in rules:
      for name, array in zip(rule.ours, rule.to_ours(*(tensors.get(h) for h in rule.hf))):
        target = wanted[name].get_value()
        if array.shape != target.shape:
          raise CheckpointError(f"{path}: {', '.join(rule.hf[:2])} has shape {array.shape} after mapping to "
                                f"{name}, the config needs {target.shape}")
        yield name, jnp.asarray(array, target.dtype)

  return cfg, arrays()


def load_pretrained(path: str | Path, dtype: str = "float32", keep_mxfp4: bool = False,
                    progress: Callable[[str], None] | None = None) -> tuple[ModelConfig, Transformer]:
  """A Hugging Face folder (config.json + safetensors) -> (config, model in eval mode), read by read_weights.
  `progress` is called with each parameter's name as it is filled."""
  cfg, arrays = read_weights(path, dtype, keep_mxfp4)
  values = {}
  for name, array in arrays:
    values[name] = array
    if progress:
      progress(name)
  graphdef, abstract, rest = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs())), WEIGHTS, ...)
  weights = nnx.from_flat_state([(p, v.replace(values[_path_str(p)])) for p, v in nnx.to_flat_state(abstract)])
  model = nnx.merge(graphdef, weights, fresh_rest(rest))
  model.eval()
  return cfg, model
