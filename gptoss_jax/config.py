"""ModelConfig: the one place where every architectural switch is defined and validated."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope", "yarn", "llama3")
FFNS = ("gelu", "swiglu", "clamped_swiglu")
ROUTINGS = ("topk_softmax", "softmax_topk")
DISPATCHES = ("grouped", "ragged", "dense")
ATTN_IMPLS = ("auto", "masked", "blockwise")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A configuration value that cannot work; the message names the field."""


# Marks a field that does not change the function a trained model computes in evaluation (dtypes, dropout,
# kernels, training losses): every other field is compared by the export's architecture check
# (ModelConfig.computation), so a new switch is compared unless it is marked here, next to it.
SAME_MATH = {"same_math": True}

# fields that only matter for mixtures of experts
MOE_FIELDS = ("top_k", "d_expert", "router_bias", "routing", "norm_topk_prob", "moe_capacity_factor",
              "moe_bias_update_rate")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  # sizes
  vocab_size: int = 256
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 4
  head_dim: int = 32
  d_ff: int = 512
  max_seq_len: int = 256
  # dropout (0 = off)
  embed_dropout: float = dataclasses.field(default=0.0, metadata=SAME_MATH)
  attn_dropout: float = dataclasses.field(default=0.0, metadata=SAME_MATH)
  resid_dropout: float = dataclasses.field(default=0.0, metadata=SAME_MATH)
  # norms: pre-norm blocks and a final norm
  norm: str = "rmsnorm"
  norm_eps: float = 1e-5
  # positions
  position: str = "rope"
  rope_theta: float = 10000.0
  rope_factor: float = 1.0  # yarn / llama3 scaling factor
  rope_original_max_len: int = 4096
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  yarn_truncate: bool = True
  yarn_attention_factor: float = 0.0  # 0: 0.1 * ln(factor) + 1
  llama3_low_freq_factor: float = 1.0
  llama3_high_freq_factor: float = 4.0
  # feed-forward (dense FFN and experts alike)
  ffn: str = "swiglu"
  ffn_bias: bool = False
  swiglu_limit: float = 7.0
  swiglu_alpha: float = 1.702
  # attention
  qkv_bias: bool = False
  out_bias: bool = False
  qk_norm: bool = False
  attn_sinks: bool = False
  sliding_window: int = 0  # 0: every layer is full causal
  window_layers: str = "alternate"  # alternate (0, 2, 4, ...) | all | explicit indices "0,3,5"
  attn_impl: str = dataclasses.field(default="auto", metadata=SAME_MATH)
  # mixture of experts (n_experts = 0: dense FFN)
  n_experts: int = 0
  top_k: int = 1
  d_expert: int = 0
  router_bias: bool = False
  routing: str = "topk_softmax"
  norm_topk_prob: bool = True
  # training from scratch balances the experts (Switch / OLMoE values); conversions set both to 0
  moe_aux_loss_weight: float = dataclasses.field(default=0.01, metadata=SAME_MATH)  # load-balancing loss
  moe_z_loss_weight: float = dataclasses.field(default=0.001, metadata=SAME_MATH)  # router z-loss (ST-MoE)
  moe_bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3: 1e-3); 0 = off
  moe_dispatch: str = dataclasses.field(default="grouped", metadata=SAME_MATH)
  moe_capacity_factor: float = 0.0  # 0: dropless
  moe_mxfp4: bool = dataclasses.field(default=False, metadata=SAME_MATH)  # how experts are stored
  # embeddings and dtypes
  tie_embeddings: bool = False
  param_dtype: str = dataclasses.field(default="float32", metadata=SAME_MATH)
  dtype: str = dataclasses.field(default="float32", metadata=SAME_MATH)
  init_std: float = dataclasses.field(default=0.02, metadata=SAME_MATH)

  def __post_init__(self):
    _check_types(self)
    positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "d_ff", "max_seq_len", "rope_theta", "rope_factor", "rope_original_max_len",
                "norm_eps", "top_k")
    for name in positive:
      if getattr(self, name) <= 0:
        raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
    for name in ("embed_dropout", "attn_dropout", "resid_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
    _check_choice("norm", self.norm, NORMS)
    _check_choice("position", self.position, POSITIONS)
    _check_choice("ffn", self.ffn, FFNS)
    _check_choice("routing", self.routing, ROUTINGS)
    _check_choice("moe_dispatch", self.moe_dispatch, DISPATCHES)
    _check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)
    _check_choice("param_dtype", self.param_dtype, DTYPES)
    _check_choice("dtype", self.dtype, DTYPES)
    if self.n_heads % self.n_kv_heads:
      raise ConfigError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
    if self.position != "learned" and self.head_dim % 2:
      raise ConfigError(f"head_dim must be even for rotary positions, got {self.head_dim}")
    if self.sliding_window < 0:
      raise ConfigError(f"sliding_window must be >= 1 (or 0 for none), got {self.sliding_window}")
    self.sliding_layers  # validates window_layers
    if self.n_experts < 0:
      raise ConfigError(f"n_experts must be >= 0, got {self.n_experts}")
    if self.n_experts:
      if self.top_k > self.n_experts:
        raise ConfigError(f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts})")
      if self.d_expert <= 0:
        raise ConfigError(f"d_expert must be > 0 when n_experts > 0, got {self.d_expert}")
      if self.moe_capacity_factor < 0:
        raise ConfigError(f"moe_capacity_factor must be >= 0, got {self.moe_capacity_factor}")
      if self.moe_mxfp4 and (self.d_model % 32 or self.d_expert % 32):
        raise ConfigError("moe_mxfp4 needs d_model and d_expert divisible by 32 (the MXFP4 block)")
    elif self.moe_mxfp4:
      raise ConfigError("moe_mxfp4 needs n_experts > 0")
    for name in ("moe_aux_loss_weight", "moe_z_loss_weight", "moe_bias_update_rate"):
      if getattr(self, name) < 0:
        raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

  # ---- derived ----
  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer: does it use the sliding window?"""
    if not self.sliding_window:
      return (False,) * self.n_layers
    spec = self.window_layers.strip()
    if spec == "alternate":
      return tuple(i % 2 == 0 for i in range(self.n_layers))
    if spec == "all":
      return (True,) * self.n_layers
    try:
      idx = {int(s) for s in spec.split(",") if s.strip()}
    except ValueError:
      raise ConfigError(
          f"window_layers must be 'alternate', 'all' or comma-separated layer indices, got {spec!r}"
      ) from None
    if any(not 0 <= i < self.n_layers for i in idx):
      raise ConfigError(f"window_layers {spec!r} names a layer outside 0..{self.n_layers - 1}")
    return tuple(i in idx for i in range(self.n_layers))

  @property
  def is_moe(self) -> bool:
    return self.n_experts > 0

  @property
  def is_glu(self) -> bool:
    return self.ffn != "gelu"

  @property
  def yarn_mscale(self) -> float:
    if self.yarn_attention_factor:
      return self.yarn_attention_factor
    return 1.0 if self.rope_factor <= 1 else 0.1 * math.log(self.rope_factor) + 1.0

  def computation(self) -> dict[str, Any]:
    """The fields that decide what the model computes (every field not marked SAME_MATH), without those
    this configuration leaves unused, and the windows per layer: two configs that agree here compute the
    same function."""
    unused = {"d_ff"} if self.is_moe else set(MOE_FIELDS)
    if self.routing != "softmax_topk" or self.top_k == 1:  # top_k = 1 is Switch's gate in both routings
      unused.add("norm_topk_prob")
    if self.position == "learned":
      unused.add("rope_theta")
    if self.position not in ("yarn", "llama3"):
      unused |= {"rope_factor", "rope_original_max_len"}
    if self.position != "yarn":
      unused |= {"yarn_beta_fast", "yarn_beta_slow", "yarn_truncate", "yarn_attention_factor"}
    if self.position != "llama3":
      unused |= {"llama3_low_freq_factor", "llama3_high_freq_factor"}
    if self.ffn != "clamped_swiglu":
      unused |= {"swiglu_limit", "swiglu_alpha"}
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if not f.metadata.get("same_math") and f.name not in unused}
    out["window_layers"] = self.sliding_layers
    out["sliding_window"] = self.sliding_window if any(self.sliding_layers) else 0
    if "yarn_attention_factor" in out:
      out["yarn_attention_factor"] = self.yarn_mscale  # 0 means 0.1 ln(factor) + 1
    return out

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
    if isinstance(d, ml_collections.ConfigDict):
      d = d.to_dict()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f"unknown model config field(s): {', '.join(unknown)}")
    return cls(**d)


def _check_choice(name: str, value: str, choices: tuple[str, ...]):
  if value not in choices:
    raise ConfigError(f"{name} must be one of {'|'.join(choices)}, got {value!r}")


_HINTS: dict[str, type] = {}


def _check_types(cfg: ModelConfig):
  if not _HINTS:
    _HINTS.update(typing.get_type_hints(ModelConfig))
  for name, want in _HINTS.items():
    value = getattr(cfg, name)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
      object.__setattr__(cfg, name, float(value))
      continue
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if not ok:
      raise ConfigError(f"{name} must be {want.__name__}, got {type(value).__name__} {value!r}")


# ---- config files: configs/<file>.py[:<arg>] with get_config(arg) -> ConfigDict(model=...) ----


def run_config(model: Mapping) -> ml_collections.ConfigDict:
  """The whole run config as config files give it: the model's fields and every other section at its
  defaults; any field can be overridden on the command line as --config.<section>.<field>=<value>."""
  return ml_collections.ConfigDict({
      "model": dict(model),
      "data": {
          "source": "shakespeare",  # shakespeare | text | hf
          "path": "",  # text: glob(s); hf: name[:config]
          "tokenizer": "byte",  # byte | gpt2 | o200k_harmony
          "vocab_file": "",  # local .tiktoken file for offline use
          "dir": "",  # prepared dataset; "" = <cache>/data/<source>-<tokenizer>
          "seq_len": 128,
          "eval_fraction": 0.01,
          "hf_split": "train",
          "hf_field": "text",
      },
      "train": {
          "steps": 1000,
          "stop_at": 0,  # stop (with a checkpoint) at this step; 0 = run to `steps`
          "batch_size": 16,  # global, in sequences
          "microbatches": 1,  # gradient accumulation
          "seed": 0,
          "lr": 3e-3,
          "warmup_steps": 100,
          "schedule": "cosine",  # cosine | linear | constant
          "min_lr_ratio": 0.1,
          "weight_decay": 0.1,
          "decay_norms": False,
          "decay_biases": False,
          "decay_embeddings": True,
          "b1": 0.9,
          "b2": 0.95,
          "eps": 1e-8,
          "clip_norm": 1.0,
          "remat": False,
          "eval_every": 100,
          "eval_batches": 8,  # held-out batches per evaluation; 0 = the whole held-out split
      },
      "mesh": {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1},
      "checkpoint": {"every": 250, "keep": 3, "async_save": True},
      "log": {
          "every": 10,
          "peak_flops": 0.0,  # per device; 0 = known accelerators' bf16 peak, or measured on CPU
          "progress": True,
      },
      "distributed": {"coordinator": "", "num_processes": 1, "process_id": 0},
  })


def preset_config(presets: Mapping[str, dict], name: str) -> ml_collections.ConfigDict:
  """A config file's get_config(): the run config (model, data, train, ...) for a named preset."""
  if name not in presets:
    raise ConfigError(f"unknown preset {name!r} (presets: {', '.join(presets)})")
  return run_config(ModelConfig(**presets[name]).to_dict())


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/file.py[:arg]`, or a preset file by name from any directory (`gpt_oss:tiny`, the
  installed `configs` package), by calling its get_config(arg)."""
  path, _, arg = spec.partition(":")
  file = Path(path)
  if file.is_file():
    module_spec = importlib.util.spec_from_file_location(f"_gptoss_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  elif path.isidentifier() and importlib.util.find_spec(f"configs.{path}") is not None:
    module = importlib.import_module(f"configs.{path}")
  else:
    names = sorted(p.stem for p in Path(importlib.util.find_spec("configs").origin).parent.glob("[!_]*.py"))
    raise ConfigError(f"config file not found: {path} (a .py file, or a preset file by name: {', '.join(names)})")
  if not isinstance(getattr(module, "get_config", None), types.FunctionType):
    raise ConfigError(f"{path} has no get_config() function")
  return module.get_config(arg) if arg else module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, str]) -> None:
  """Applies {"model.n_layers": "12", ...} (strings from the command line) in place, typed by the
  current value; an unknown key or a value of the wrong type raises ConfigError naming it."""
  for key, text in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        raise ConfigError(f"unknown config key: {key}")
      node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ConfigError(f"unknown config key: {key}")
    node[leaf] = _parse_like(node[leaf], text, key)


def _parse_like(current: Any, text: str, key: str) -> Any:
  try:
    if isinstance(current, bool):
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError
      return text.lower() in ("true", "1")
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str) or current is None:
      return text
    if isinstance(current, (tuple, list)):
      value = ast.literal_eval(text)
      return type(current)(value if isinstance(value, (tuple, list)) else (value,))
  except (ValueError, SyntaxError):
    raise ConfigError(f"{key}: cannot read {text!r} as {type(current).__name__}") from None
  raise ConfigError(f"{key}: cannot override a value of type {type(current).__name__}")


def model_config_from_file(spec: str, overrides: Mapping[str, str] | None = None) -> ModelConfig:
  config = load_config_file(spec)
  apply_overrides(config, overrides or {})
  return ModelConfig.from_dict(config.model)


def parse_override_args(args: list[str]) -> dict[str, str]:
  """['--config.model.n_layers=12', ...] -> {'model.n_layers': '12'}."""
  overrides = {}
  for arg in args:
    key, eq, value = arg.partition("=")
    if not key.startswith("--config.") or not eq:
      raise ConfigError(f"unrecognized argument: {arg} (overrides look like --config.model.n_layers=12)")
    overrides[key.removeprefix("--config.")] = value
  return overrides
