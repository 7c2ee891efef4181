"""Parameters, active parameters, FLOPs, KV cache and weight memory of a config, read off the real
modules by abstract evaluation (nnx.eval_shape: shapes only, nothing allocated).

  python -m gptoss_jax.inspect --config configs/gpt_oss.py:20b [--seq-len N] [--json] [--config.model.X=V]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from flax import nnx

from gptoss_jax.config import ConfigError, ModelConfig

from gptoss_jax.config_files import model_config_from_file, parse_override_args
from gptoss_jax.model import Transformer, rngs

MXFP4_BYTES_PER_PARAM = 17 / 32  # 4-bit values plus one 8-bit scale per 32
LOOKUPS = ("embed", "pos_embed.table")  # tables read by index (the token embedding only when untied)


@dataclasses.dataclass(frozen=True)
class ModelStats:
  total_params: int
  embedding_params: int  # lookup tables (token embedding if untied, learned positions)
  expert_params: int  # all experts' weights and biases
  active_params: int  # per token: total - embedding lookups - inactive experts
  seq_len: int
  train_flops_per_token: float  # 3 x forward: matmuls with active weights + attention scores
  kv_bytes_per_token: int  # bf16 K and V of the full-attention layers
  kv_window_bytes: int  # bf16 K and V held by the sliding layers (fixed: window tokens each)
  weight_bytes_bf16: int
  weight_bytes_mxfp4: int  # experts' matmul weights in MXFP4, everything else bf16


@dataclasses.dataclass(frozen=True)
class Weight:
  size: int
  axes: tuple  # the logical axes the model declares for it (`nnx.Param(..., axes=...)`)

  @property
  def routed(self) -> bool:
    """One of the routed experts' parameters: it has the `expert` axis."""
    return "expert" in self.axes

  @property
  def matmul(self) -> bool:
    """A weight a token is multiplied by: it carries the residual stream's `embed` axis and at least one
    other besides `expert` (biases, norm scales and sinks have one at most)."""
    return "embed" in self.axes and sum(a != "expert" for a in self.axes) >= 2


def weights(cfg: ModelConfig) -> dict[str, Weight]:
  """Every parameter of the model by path, with its size and logical axes, from abstract evaluation
  (expert weights unpacked)."""
  model = nnx.eval_shape(lambda: Transformer(cfg.replace(moe_mxfp4=False), rngs()))
  out = {}
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = tuple(v.get_metadata().get("axes") or ())
    if len(axes) != v.get_value().ndim:
      raise ValueError(f"{'.'.join(map(str, path))}: declares axes {axes} for shape {v.get_value().shape}")
    out[".".join(map(str, path))] = Weight(math.prod(v.get_value().shape), axes)
  return out


def mean_context(seq_len: int, window: int) -> float:
  """Average number of keys a causal query attends to over positions 0..seq_len-1."""
  if not window or window >= seq_len:
    return (seq_len + 1) / 2
  return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def stats(cfg: ModelConfig, seq_len: int | None = None) -> ModelStats:
  """Counts by what each parameter declares (its logical axes), not by its name: routed experts carry the
  `expert` axis (a fraction top_k / n_experts of them active per token), matmul weights `embed` and another."""
  seq_len = seq_len or cfg.max_seq_len
  params = weights(cfg)
  total = sum(w.size for w in params.values())
  lookups = {p for p in LOOKUPS if p in params and not (p == "embed" and cfg.tie_embeddings)}  # tied: unembedding
  embedding = sum(params[p].size for p in lookups)
  experts = sum(w.size for w in params.values() if w.routed)
  share = cfg.top_k / cfg.n_experts if cfg.is_moe else 1.0
  active = total - embedding - (experts * (cfg.n_experts - cfg.top_k) // cfg.n_experts if cfg.is_moe else 0)

  # forward FLOPs per token: 2 per active matmul weight (not lookups, norms, biases) + attention
  matmul = sum(w.size * (share if w.routed else 1.0) for p, w in params.items() if w.matmul and p not in lookups)
  attention = sum(4 * cfg.n_heads * cfg.head_dim * mean_context(seq_len, cfg.sliding_window if s else 0)
                  for s in cfg.sliding_layers)
  kv_per_layer = 2 * cfg.n_kv_heads * cfg.head_dim * 2
  n_sliding = sum(cfg.sliding_layers)
  expert_matrices = sum(w.size for w in params.values() if w.routed and w.matmul)
  return ModelStats(
      total_params=total, embedding_params=embedding, expert_params=experts, active_params=active,
      seq_len=seq_len, train_flops_per_token=3 * (2 * matmul + attention),
      kv_bytes_per_token=kv_per_layer * (cfg.n_layers - n_sliding),
      kv_window_bytes=kv_per_layer * n_sliding * min(cfg.sliding_window, seq_len),
      weight_bytes_bf16=2 * total,
      weight_bytes_mxfp4=round(2 * (total - expert_matrices) + MXFP4_BYTES_PER_PARAM * expert_matrices))


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STATE_BYTES_PER_PARAM = 16  # float32 master weights, gradients and AdamW's two moments
# the count below, uncalibrated, came to 0.61-0.85 of XLA:CPU's own memory analysis of the compiled train step
# (gpt2:tiny, gpt_oss:tiny and a 6-layer d256 model, batch 16 x 128): XLA keeps more than the named activations
ACTIVATION_CALIBRATION = 1.5


def activation_bytes_per_token(cfg: ModelConfig, seq_len: int, remat: bool = False) -> float:
  """An estimate of the activation memory a train step keeps per token for the backward pass (bytes).
  Per layer, in the compute dtype: the norms' and projections' inputs and outputs (about 10 x d_model), the
  queries, keys and values and the attention output (4 x q width + 2 x kv width), the FFN's hidden
  activations (3 x the active hidden width: the input projection's output, its activation, the gate's
  product); and the attention probabilities in float32 (heads x the mean number of keys a query sees);
  times ACTIVATION_CALIBRATION. With `remat` only each layer's input stays, plus one layer's worth
  recomputed at a time. The logits and their gradient (float32) come on top: 8 x vocabulary."""
  b = DTYPE_BYTES[cfg.dtype]
  hidden = (cfg.top_k * cfg.d_expert if cfg.is_moe else cfg.d_ff) * (2 if cfg.is_glu else 1)
  q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  per_layer = [b * (10 * cfg.d_model + 4 * q + 2 * kv + 3 * hidden)
               + 4 * cfg.n_heads * mean_context(seq_len, cfg.sliding_window if s else 0) for s in cfg.sliding_layers]
  layers = b * cfg.d_model * cfg.n_layers + max(per_layer) if remat else sum(per_layer)
  return ACTIVATION_CALIBRATION * layers + 8 * cfg.vocab_size


def train_memory_bytes(cfg: ModelConfig, seq_len: int, tokens_per_device: int, remat: bool = False,
                       state_shards: int = 1) -> float:
  """An estimate of one device's peak memory in a train step: the training state (16 bytes per parameter,
  divided over `state_shards` when fsdp shards it) plus the activations of the tokens it processes at once
  (its share of the batch, divided by the microbatches)."""
  return (STATE_BYTES_PER_PARAM * stats(cfg, seq_len).total_params / state_shards
          + tokens_per_device * activation_bytes_per_token(cfg, seq_len, remat))


def _human(n: float, unit: str = "") -> str:
  for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{suffix}{unit}"
  return f"{n:.0f}{unit}"


def _bytes(n: float) -> str:
  for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
    if n >= scale:
      return f"{n / scale:.2f} {suffix}"
  return f"{n:.0f} B"


def format_stats(s: ModelStats) -> str:
  rows = [
      ("total parameters", f"{s.total_params:,} ({_human(s.total_params)})"),
      ("active parameters / token", f"{s.active_params:,} ({_human(s.active_params)})"),
      ("embedding parameters", f"{s.embedding_params:,} ({_human(s.embedding_params)})"),
      ("expert parameters", f"{s.expert_params:,} ({_human(s.expert_params)})"),
      (f"training FLOPs / token (seq {s.seq_len})", f"{s.train_flops_per_token:.4g} ({_human(s.train_flops_per_token, 'FLOP')})"),
      ("KV cache / token (bf16, full layers)", _bytes(s.kv_bytes_per_token)),
      ("KV cache of sliding layers (fixed)", _bytes(s.kv_window_bytes)),
      ("weights in bf16", _bytes(s.weight_bytes_bf16)),
      ("weights with MXFP4 experts", _bytes(s.weight_bytes_mxfp4)),
  ]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gptoss_jax.inspect", description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="a preset file by name (gpt_oss:20b) or a path")
  parser.add_argument("--seq-len", type=int, default=None, help="sequence length for attention FLOPs")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args, rest = parser.parse_known_args(argv)
  try:
    overrides = parse_override_args(rest)
    cfg = model_config_from_file(args.config, overrides)
    if args.seq_len is not None and args.seq_len <= 0:
      raise ConfigError(f"--seq-len must be > 0, got {args.seq_len}")
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  s = stats(cfg, args.seq_len)
  print(json.dumps(dataclasses.asdict(s) | {"config": args.config}) if args.json else format_stats(s))
  return 0


if __name__ == "__main__":
  from gptoss_jax import runtime
  runtime.configure()  # before JAX starts its backend
  sys.exit(main())
