"""Sweeps expand to the intended configs, the solvers meet their budgets, the report reads metric files,
and a mini sweep runs end to end through the training command."""

import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from experiments import cost, folders, paired, plan, power, report, run, slots, supervise, sweeps, sync
from experiments.description import RunSpec, SweepDescription
from experiments.sweeps import SCALES, active, build, solve, total
from conftest import COMPILE_FLAGS, REPO
from gptoss_jax.config import ConfigError, ModelConfig, RunConfig
from gptoss_jax.config_files import load_config_file

TINY = SCALES["tiny"]


@pytest.fixture(scope="module")
def ladder():
  return build("ladder", "tiny").runs


def changed(a: ModelConfig, b: ModelConfig) -> set[str]:
  x, y = a.to_dict(), b.to_dict()
  return {k for k in x if x[k] != y[k]}


def test_ladder_changes_exactly_the_named_fields_one_rung_at_a_time(ladder):
  names = [r.name for r in ladder]
  assert names == ["gpt2", "no_dropout", "rope", "rmsnorm", "no_biases", "swiglu", "gqa", "moe",
                   "sliding_window", "sinks", "attention_biases"]
  for before, after in zip(ladder, ladder[1:]):
    assert after.baseline == before.name
    assert changed(before.model, after.model) == set(after.changes), after.name
  # the named change, plus the FFN width where the change moved the parameter count by more than 1%
  expected = {"no_dropout": {"embed_dropout", "attn_dropout", "resid_dropout"}, "rope": {"position", "d_ff"},
              "rmsnorm": {"norm"}, "no_biases": {"qkv_bias", "out_bias", "ffn_bias", "d_ff"},
              "swiglu": {"ffn", "d_ff"}, "gqa": {"n_kv_heads", "d_ff"},
              "moe": {"n_experts", "top_k", "d_expert", "router_bias", "moe_bias_update_rate"},
              "sliding_window": {"sliding_window"}, "sinks": {"attn_sinks"},
              "attention_biases": {"qkv_bias", "out_bias"}}
  assert {r.name: set(r.changes) for r in ladder[1:]} == expected


def test_every_moe_run_balances_with_the_bias_and_dense_runs_carry_none():
  """The scale's aux-loss-free rate on every MoE run of every sweep (beside the default balancing loss),
  and no MoE-only field on a dense run, so dense runs keep the configs they trained with."""
  for name in ("ladder", "width_depth", "experts"):
    for r in build(name, "tiny").runs:
      m = r.model
      assert m.moe_bias_update_rate == (TINY.moe_bias_update_rate if m.is_moe else 0.0), (name, r.name)
      assert m.moe_aux_loss_weight > 0 and m.moe_z_loss_weight > 0, (name, r.name)


def test_every_rung_compares_at_matched_parameters(ladder):
  """Total parameters within 2% of the rung before; the MoE rung matches active parameters instead."""
  for before, after in zip(ladder, ladder[1:]):
    measure = active if after.name == "moe" else total
    assert abs(measure(after.model) / measure(before.model) - 1) <= 0.02, after.name


@pytest.mark.parametrize("scale, least", [("tiny", 10.0), ("small", 20.0), ("gpu", 20.0)])
def test_every_run_trains_on_enough_tokens_per_active_parameter_within_one_epoch(scale, least):
  s = sweeps.SCALES[scale]
  tokens = s.run["train.steps"] * s.run["train.batch_size"] * s.run["data.seq_len"]
  if "data.max_tokens" in s.run:  # a training sees each token of the prepared train split at most once
    held_out = s.run["data.val_fraction"] + s.run["data.test_fraction"]
    assert tokens <= s.run["data.max_tokens"] * (1 - held_out) * 0.98
  for name in ("ladder", "width_depth", "experts"):  # the swiglu probe's wide run has 1.5x the FFN on purpose
    for r in build(name, scale).runs:
      assert tokens >= least * active(r.model), (name, r.name, tokens / active(r.model))


def test_the_swiglu_probe_compares_matched_and_gelu_width_swiglu_with_the_ladders_gelu():
  runs = {r.name: r for r in build("swiglu", "tiny").runs}
  rungs = {r.name: r for r in build("ladder", "tiny").runs}
  assert runs["gelu"].model == rungs["no_biases"].model and runs["swiglu"].model == rungs["swiglu"].model
  wide = runs["swiglu_wide"].model
  assert wide.ffn == "swiglu" and wide.d_ff == runs["gelu"].model.d_ff
  assert wide == runs["gelu"].model.replace(ffn="swiglu")  # only the activation differs from gelu
  assert runs["swiglu"].baseline == runs["swiglu_wide"].baseline == "gelu"
  assert set(runs) == {"gelu", "swiglu", "swiglu_wide", "swiglu_init"}


def test_the_swiglu_probes_init_run_starts_with_an_ffn_output_as_large_as_gelus():
  """Measured on the FFN modules themselves at init (unit-RMS inputs, as after the norm), at a width where the
  sample RMS is within a few percent of its expectation: the scaled SwiGLU's output matches GELU's, where the
  unscaled one is several times smaller."""
  from flax import nnx
  from gptoss_jax.model.ffn import MLP
  runs = {r.name: r for r in build("swiglu", "tiny").runs}
  started = runs["swiglu_init"].model
  assert started == runs["swiglu"].model.replace(ffn_out_init_scale=started.ffn_out_init_scale)
  assert runs["swiglu_init"].baseline == "gelu"
  x = np.random.default_rng(0).standard_normal((4096, started.d_model)).astype(np.float32)
  x /= np.sqrt(np.mean(x * x, axis=-1, keepdims=True))  # each row at unit RMS, as the norm leaves it

  def out_rms(cfg, width):  # 8 initialisations' worth of hidden units, the same per-unit statistics
    cfg = cfg.replace(d_ff=cfg.d_ff * width)
    y, _ = MLP(cfg, nnx.Rngs(0))(x[None])
    return float(np.sqrt(np.mean(np.square(y)) / width))
  gelu = out_rms(runs["gelu"].model, 8)
  assert out_rms(started, 8) == pytest.approx(gelu, rel=0.05)
  assert out_rms(runs["swiglu"].model, 8) < gelu / 4


@pytest.mark.parametrize("scale", list(SCALES))
def test_each_scales_plan_chooses_its_rates_on_seeds_it_never_reports_over_a_2x_grid(tmp_path, scale):
  """What the runner would train first for the ladder: a grid of at least 3 rates, at most 2x apart, on two
  selection seeds or more, none of them a compared seed (the report's numbers never choose the rate)."""
  args, rest = run._parser().parse_known_args(["ladder", "--scale", scale])
  sweep, _, description = run._plan(args, rest)
  jobs = plan.Scheduler(sweep, tmp_path, description).jobs()
  selection, grid = {j.seed for j in jobs}, sorted({j.lr for j in jobs})
  assert len(selection) >= 2 and not selection & set(range(description.seeds))
  assert all(j.folder.name.startswith("lr") for j in jobs)  # no compared seed before its rate is chosen
  assert len(grid) >= 3 and max(b / a for a, b in zip(grid, grid[1:])) <= 2.0 + 1e-9
  assert description.seeds >= (8 if scale == "tiny" else 2)


def test_ladder_runs_from_gpt2_to_a_gpt_oss_style_model(ladder):
  first, last = ladder[0].model, ladder[-1].model
  assert (first.norm, first.position, first.ffn, first.n_kv_heads, first.n_experts) == \
      ("layernorm", "learned", "gelu", first.n_heads, 0)
  assert first.qkv_bias and first.ffn_bias and first.resid_dropout == 0.1 and first.sliding_window == 0
  assert (last.norm, last.position, last.ffn, last.window_layers) == ("rmsnorm", "rope", "swiglu", "alternate")
  assert last.n_kv_heads < last.n_heads and last.n_experts == TINY.moe[0] and last.top_k == TINY.moe[1]
  assert last.attn_sinks and last.qkv_bias and last.out_bias and last.sliding_window == TINY.window
  assert last.embed_dropout == last.attn_dropout == last.resid_dropout == 0.0


def test_ladder_matches_parameters_where_it_says(ladder):
  by_name = {r.name: r.model for r in ladder}
  gelu, swiglu = by_name["no_biases"], by_name["swiglu"]
  # GELU MLP: 2 matrices of D x F; SwiGLU: 3 of D x F', so F' = 2F/3
  assert abs(swiglu.d_ff - 2 * gelu.d_ff / 3) <= 1
  assert abs(total(swiglu) / total(gelu) - 1) < 0.01
  dense, moe = by_name["gqa"], by_name["moe"]
  assert abs(active(moe) / active(dense) - 1) < 0.01
  assert abs(moe.d_expert - dense.d_ff / moe.top_k) <= 2  # k experts of width F/k + the router
  assert total(moe) > 2 * total(dense)


def test_solver_finds_the_nearest_integer():
  line = lambda x: 3 * x + 7
  assert solve(lambda x: x, line, 100, guess=1) == 31
  assert solve(lambda x: x, line, 101, guess=500) == 31  # 100 is nearer than 103
  assert solve(lambda x: x, line, 102, guess=40) == 32
  assert solve(lambda x: x, lambda x: x * x, 1_000_000, guess=3) == 1000


def test_width_depth_keeps_head_dim_and_lands_within_two_percent_of_the_budget(ladder):
  base = ladder[-1].model
  budget = total(base)
  runs = build("width_depth", "tiny").runs
  assert [r.model.n_layers for r in runs] == list(TINY.depths)
  widths = [r.model.d_model for r in runs]
  assert widths == sorted(widths, reverse=True) and len(set(widths)) == len(widths)
  reference = next(r for r in runs if r.model.n_layers == base.n_layers)
  assert reference.model == base and reference.baseline == ""
  for r in runs:
    assert abs(total(r.model) / budget - 1) <= 0.02, r.name
    assert r.model.head_dim == base.head_dim, r.name
    assert r.model.n_heads // r.model.n_kv_heads == base.n_heads // base.n_kv_heads
    assert abs(r.model.n_heads * r.model.head_dim / r.model.d_model - 1) <= 0.5, r.name  # heads follow width
    assert changed(base, r.model) <= {"n_layers", "d_model", "n_heads", "n_kv_heads", "d_expert"}
    assert r is reference or r.baseline == reference.name
  heads = [r.model.n_heads for r in runs]
  assert heads == sorted(heads, reverse=True) and heads[0] > heads[-1]


def test_expert_counts_keep_active_parameters_and_pair_few_large_with_many_small():
  runs = {r.name: r.model for r in build("experts", "tiny").runs}
  dense = runs.pop("dense")
  assert not dense.is_moe
  assert {(m.n_experts, m.top_k) for m in runs.values()} == set(TINY.expert_counts.items()) | {(16, 4)}
  for name, m in runs.items():
    assert abs(active(m) / active(dense) - 1) <= 0.02, name
  few, many = runs["e4_k1"], runs["e16_k4"]
  assert abs(total(many) / total(few) - 1) <= 0.02
  assert many.d_expert < few.d_expert / 3
  assert total(runs["e64_k4"]) > total(runs["e8_k2"]) > total(dense)


def test_each_training_gets_a_typed_config(ladder, tmp_path):
  """The runner passes typed configs (written as run.json, read back by the training command), never
  override strings: the run's model, the scale's settings, the command line's overrides, seed and lr."""
  sweep = build("ladder", "tiny")
  for r in (ladder[0], ladder[7], ladder[-1]):
    config = sweep.config(r, seed=2, lr=0.004, extra={"model.dtype": "bfloat16", "train.steps": "50"})
    assert config.model == r.model.replace(dtype="bfloat16")
    assert (config.train.seed, config.train.lr, config.train.steps) == (2, 0.004, 50)
    assert config.data.seq_len == TINY.run["data.seq_len"] and config.log.progress is False
    folder = tmp_path / r.name
    folder.mkdir()
    argv = supervise.command(sweep, r, 2, 0.004, folder, {"model.dtype": "bfloat16", "train.steps": "50"})
    assert argv[argv.index("--config") + 1] == str(folder / "run.json") and not any(a.startswith("--config.") for a in argv)
    assert RunConfig.from_dict(load_config_file(str(folder / "run.json"))) == config


def test_dry_run_prints_every_run_and_trains_nothing(tmp_path, capsys):
  assert run.main(["experts", "--dry-run", "--workdir", str(tmp_path / "sweep")]) == 0
  out = capsys.readouterr().out
  for name in ("dense", "e4_k1", "e64_k4", "e16_k4"):
    assert f"\n{name} " in out
  assert not (tmp_path / "sweep").exists()


def test_costs_read_from_a_gpus_program_agree_with_the_formulas():
  """--from-program's figures for a GPU's MoE training step (traced and compiled here, 2 layers, fsdp over 4): the
  FLOPs per token of its matmuls a little above inspect's count (the blockwise attention computes whole blocks on
  the diagonal where the formula counts the causal half, `blocked` its padding rows), its memory near the
  estimate's; the CPU's program, whose expert loop the routing bounds, is refused."""
  from gptoss_jax.inspect import stats
  config = load_config_file("gpt_oss:tiny")
  config.model.n_layers, config.train.batch_size, config.data.seq_len = 2, 16, 128
  config.mesh.data, config.mesh.fsdp = 1, -1
  config = RunConfig.from_dict(config)
  flops, memory = cost.program_costs(config, "gpu", devices=4)
  formula = stats(config.model, 128).train_flops_per_token
  assert 1.0 < flops / formula < 1.3
  assert 0.5 < memory / cost.memory_gib(config, devices=4) < 2.0
  with pytest.raises(ConfigError, match="cannot all be counted"):
    cost.program_costs(config, "cpu")


@pytest.mark.parametrize("mesh, devices, shards", [({}, 8, 1), (dict(data=1, fsdp=-1), 8, 8),
                                                    (dict(data=1, fsdp=2, expert=4), 8, 8),
                                                    (dict(data=2, fsdp=1, expert=-1), 8, 4),
                                                    (dict(data=2, fsdp=2, tensor=2, expert=1), 8, 2)])
def test_the_memory_estimate_splits_the_state_over_fsdp_and_expert(mesh, devices, shards):
  """The estimate's state on a device: its whole size over fsdp x expert (-1: the devices the other axes leave),
  the weights' and optimizer's share of train_memory_bytes."""
  from gptoss_jax.inspect import train_memory_bytes
  config = load_config_file("gpt_oss:tiny")
  config.mesh.data = -1 if "data" not in mesh else mesh["data"]
  for axis, n in mesh.items():
    setattr(config.mesh, axis, n)
  config = RunConfig.from_dict(config)
  T = config.data.seq_len
  tokens = config.train.batch_size * T // devices
  want = train_memory_bytes(config.model, T, tokens, config.train.remat, shards) / 2**30
  assert cost.memory_gib(config, devices) == pytest.approx(want)


def test_bad_sweep_arguments_get_one_line_and_status_2(capsys):
  assert run.main(["nope"]) == 2
  assert run.main(["ladder", "--runs", "gpt2,nope"]) == 2
  assert run.main(["ladder", "--config.train.nope=1"]) == 2
  assert run.main(["ladder", "--config.model.n_kv_heads=3"]) == 2  # 4 heads do not divide into 3
  assert run.main(["ladder", "--lrs", "1e-3,fast"]) == 2
  assert run.main(["ladder", "--config.train.lr=1e-3"]) == 2  # the runner sets it
  assert run.main(["ladder", "--jobs", "0"]) == 2
  assert run.main(["ladder", "--dry-run", "--from-program"]) == 2  # no --device: no cost table to fill
  errors = capsys.readouterr().err.strip().splitlines()
  assert len(errors) == 8 and all(e.startswith("error: ") for e in errors)


def _write_metrics(folder, final: float, steps: int = 20, se: float = 0.01, extra: dict | None = None):
  folder.mkdir(parents=True)
  rows = [{"step": s, "train/loss": 5.0, "perf/tokens_per_s": 100.0 * (s // 10), "perf/peak_memory_gb": 0.5,
           "perf/elapsed_s": 2.0 * s, **(extra or {})} for s in (10, steps)]
  rows += [{"step": 10, "eval/loss": final + 1.0}, {"step": steps, "eval/loss": final, "eval/loss_se": se}]
  (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fake_sweep(folder, finals: dict[str, list[float]], baselines: dict[str, str], grids=None, experts=None):
  """Fabricated metrics of a finished sweep: finals[run][seed], grids[run] = {lr: loss}."""
  runs = []
  for name, values in finals.items():
    E, k = (experts or {}).get(name, (0, 1))
    runs.append({"name": name, "changes": ["x"], "baseline": baselines.get(name, ""), "note": "",
                 "total_params": 1000, "active_params": 500, "flops_per_token": 3000.0, "n_experts": E, "top_k": k,
                 "steps": 20, "stop_at": 0, "tokens": 1280, "tokens_per_step": 64})
    health = {f"moe/max_load_ratio/layer0{i}": 1.0 + i for i in range(2)} if E else {}
    health |= {f"moe/usage_entropy/layer0{i}": 0.9 - 0.1 * i for i in range(2)} if E else {}
    health |= {f"moe/dead_experts/layer0{i}": 0.0 for i in range(2)} if E else {}
    for seed, final in enumerate(values):
      _write_metrics(folder / name / f"seed{seed}", final, extra=health)
      if E:
        balancing = {"moe_aux_loss_weight": 0.01, "moe_z_loss_weight": 0.001, "moe_bias_update_rate": 0.003}
        (folder / name / f"seed{seed}" / "config.json").write_text(json.dumps({"model": balancing}))
    for lr, loss in (grids or {}).get(name, {}).items():
      _write_metrics(folders.lr_dir(folder, name, lr, 1000), loss)
  (folder / "sweep.json").write_text(json.dumps({"sweep": "fake", "scale": "tiny", "seeds": 5, "lrs": [1e-3, 3e-3, 1e-2],
                                                 "selection_seeds": [1000], "overrides": {}, "runs": runs}))


def _table(text: str, header: str) -> dict[str, list[str]]:
  """Rows of the markdown table whose header row starts with `header`, by their first cell."""
  return {cells[0]: cells for cells in _table_rows(text, header)}


BASE_LOSSES = np.array([2.00, 2.05, 1.98, 2.03, 2.01, 2.04, 1.99, 2.02])
DIFFS = {"a": [-0.10, -0.11, -0.09, -0.10, -0.12, -0.08, -0.11, -0.10],  # every seed better: distinguishable
         "b": [0.02, 0.03, 0.0, 0.03, 0.01, 0.02, -0.01, 0.03],  # the t-test alone would call it
         "c": [-0.02, 0.01, -0.03, 0.002, -0.02, 0.01, -0.01, 0.0]}  # nothing


HELDOUT_B = np.random.default_rng(0).normal(0.02, 0.01, size=(8, 6))  # seeds x test batches


def _plain_sign_flip(d) -> float:
  """Every one of the 2^n sign patterns, one at a time."""
  observed, hits = abs(sum(d)), 0
  for signs in itertools.product((1, -1), repeat=len(d)):
    hits += abs(sum(s * x for s, x in zip(signs, d))) >= observed - 1e-12
  return hits / 2 ** len(d)


def _plain_holm(p: dict[str, float]) -> dict[str, float]:
  order, out, running = sorted(p, key=p.get), {}, 0.0
  for i, name in enumerate(order):
    running = max(running, min(1.0, (len(p) - i) * p[name]))
    out[name] = running
  return out


def test_the_verdicts_say_what_the_tables_say(tmp_path):
  """The report's generated sentences against its own tables: every comparison in the bullet its verdict cell
  names, with the table's Δ and simultaneous interval; the caveats where they hold (a sign that flips across
  the shared learning rates, a run whose trainings another sweep holds, a router at collapse after warm-up)."""
  from experiments import readme
  sweep = tmp_path / "sweeps" / "fake"
  finals = {"base": list(BASE_LOSSES)} | {k: list(BASE_LOSSES + np.array(d)) for k, d in DIFFS.items()}
  finals["moe"] = list(BASE_LOSSES - 0.2)
  _fake_sweep(sweep, finals, {k: "base" for k in [*DIFFS, "moe"]}, experts={"moe": (8, 2)},
              grids={"a": {1e-3: 2.0, 3e-3: 2.2}, "base": {1e-3: 2.1, 3e-3: 2.1}, "c": {1e-3: 2.0, 3e-3: 2.05}})
  for seed in range(len(BASE_LOSSES)):  # moe: a layer at the collapse value (8 / 2) at step 20, after warm-up
    path = sweep / "moe" / f"seed{seed}" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["moe/max_load_ratio/layer01"] = 4.0 if seed == 3 else 2.0
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = json.dumps(RunConfig.from_dict({"train": {"steps": 20, "warmup_steps": 10}}).to_dict())
  other = tmp_path / "sweeps" / "other"  # c's trainings, held by another sweep too
  for seed in range(len(BASE_LOSSES)):
    (sweep / "c" / f"seed{seed}" / "config.json").write_text(config)
    shutil.copytree(sweep / "c" / f"seed{seed}", other / "c_too" / f"seed{seed}")
  (other / "sweep.json").write_text("{}")
  assert report.main([str(sweep), "--no-baselines"]) == 0
  text = (sweep / "report.md").read_text()
  bullets = {line.split("**")[1]: line for line in readme.verdicts(text).splitlines()}
  rows = _table(text, "| run | vs | n |")
  assert len(rows) == 4
  for name, row in rows.items():
    kind = {"**distinguishable: better**": "better", "**distinguishable: worse**": "worse"}.get(row[10], "not distinguishable")
    holding = [k for k, line in bullets.items() if f"`{name}` vs `base` {row[3]}" in line]
    assert holding == [f"Final test loss, {kind}"], (name, holding)
    if kind != "not distinguishable":
      assert f"`{name}` vs `base` {row[3]} {row[9]}" in bullets[holding[0]]  # Δ and the simultaneous interval
  better = bullets["Final test loss, better"]
  assert "`a` vs `base` -0.1013" in better and "learning-rate sensitive: -0.100 at 0.001, +0.100 at 0.003" in better
  assert "`c` = `other`'s `c_too` (seeds 0-7)" in bullets["Final test loss, not distinguishable"]
  assert bullets["Final test loss, worse"] == "- **Final test loss, worse**: none."
  assert "in 1 of 8 trainings (seed 3)" in bullets["Router health, `moe`"]
  assert "`c` = `other`'s `c_too`" in bullets["Shared trainings"] and "`a`" not in bullets["Shared trainings"]


def test_paired_statistics_match_plain_formulas_with_holm_over_both_tests(tmp_path):
  n, m = len(BASE_LOSSES), len(DIFFS)
  finals = {"base": list(BASE_LOSSES)} | {k: list(BASE_LOSSES + np.array(d)) for k, d in DIFFS.items()}
  _fake_sweep(tmp_path, finals, {k: "base" for k in DIFFS})
  for seed in range(n):  # per test batch: base 2.0 everywhere, b + HELDOUT_B
    for name, losses in (("base", np.full(6, 2.0)), ("b", 2.0 + HELDOUT_B[seed])):
      (tmp_path / name / f"seed{seed}" / "heldout.json").write_text(json.dumps({"step": 20, "batch_losses": list(losses)}))
  assert report.main([str(tmp_path), "--no-baselines"]) == 0
  rows = _table((tmp_path / "report.md").read_text(), "| run | vs | n |")
  expected = {}
  for name in DIFFS:
    d = np.array(finals[name]) - BASE_LOSSES
    mean, se = d.mean(), d.std(ddof=1) / np.sqrt(n)
    p = 2 * (1 - scipy_stats.t.cdf(abs(mean / se), n - 1))  # two-sided paired t-test
    expected[name] = (mean, se, p, _plain_sign_flip(list(d)))
  holm_t = _plain_holm({k: v[2] for k, v in expected.items()})
  holm_sign = _plain_holm({k: v[3] for k, v in expected.items()})
  for name, (mean, se, p, p_sign) in expected.items():
    row = rows[name]
    half, wide = scipy_stats.t.ppf(0.975, n - 1) * se, scipy_stats.t.ppf(1 - 0.05 / (2 * m), n - 1) * se
    assert row[1:5] == ["base", str(n), f"{mean:+.4f}", f"[{mean - half:+.4f}, {mean + half:+.4f}]"]
    assert float(row[5]) == pytest.approx(p, rel=0.01) and float(row[6]) == pytest.approx(p_sign, rel=0.01)
    assert float(row[7]) == pytest.approx(holm_t[name], rel=0.01)
    assert float(row[8]) == pytest.approx(holm_sign[name], rel=0.01)
    assert row[9] == f"[{mean - wide:+.4f}, {mean + wide:+.4f}]"  # simultaneous (Bonferroni) interval
  assert expected["a"][3] == pytest.approx(2 / 2 ** n)  # every seed agrees: the smallest sign-flip p
  assert rows["a"][10] == "**distinguishable: better**"
  assert holm_t["b"] <= 0.05 < holm_sign["b"]  # Holm rejects for the t-test, not for the sign-flip test
  assert rows["b"][10] == rows["c"][10] == "not distinguishable"
  noise = _table((tmp_path / "report.md").read_text(), "| run | vs | seed standard error")
  assert set(noise) == {"b"}  # the only run with test batches beside its baseline's
  assert noise["b"][2] == f"{expected['b'][1]:.4f}"
  assert noise["b"][3] == f"{np.std(HELDOUT_B.mean(0), ddof=1) / np.sqrt(HELDOUT_B.shape[1]):.4f}"
  text = (tmp_path / "report.md").read_text()
  assert "Distinguishable at this scale: `a` vs `base`" in text
  for png in ("loss_vs_steps.png", "loss_vs_flops.png", "final_loss.png", "differences.png", "lr_grid.png"):
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
  assert not (tmp_path / "router_health.png").exists()  # no MoE run


def test_five_seeds_cannot_pass_the_sign_flip_test_whatever_the_t_test_says():
  from experiments.paired import compare, corrected
  d = np.array([-0.10, -0.11, -0.09, -0.10, -0.12])
  (c,) = corrected([compare("a", "base", d)])
  assert c.p < 1e-4 and c.p_sign == pytest.approx(2 / 32) and not c.distinguishable


@pytest.mark.parametrize("n, m", [(8, 10), (8, 6), (9, 10), (5, 1)])
def test_the_sign_flip_floor_is_what_holm_makes_of_seeds_that_all_agree(n, m):
  """The smallest Holm-adjusted sign-flip p is that of m comparisons whose every seed agrees, and the seeds
  needed are the fewest n for which it reaches 0.05 (a plain loop)."""
  from experiments.paired import compare, corrected, seeds_needed, sign_flip_floor
  rng = np.random.default_rng(n + m)
  agreeing = [compare(f"r{i}", "base", -0.1 - 0.01 * rng.random(n)) for i in range(m)]
  assert sign_flip_floor(n, m) == pytest.approx(min(c.p_sign_holm for c in corrected(agreeing)))
  assert seeds_needed(m) == next(k for k in range(1, 30) if m * 2 / 2 ** k <= 0.05)
  assert (sign_flip_floor(n, m) <= 0.05) == (n >= seeds_needed(m))


def test_an_override_that_changes_what_runs_compare_is_refused_unless_allowed(capsys):
  """Learned positions for every run of the context sweep erase `learned`'s change; on the ladder they erase
  `rope`'s and move the MoE rung's total against its baseline's by 3%. One line, exit 2; a width for every
  run keeps every comparison; --allow-changed-runs lets it through, recorded in the sweep's description."""
  assert run.main(["context", "--dry-run", "--config.model.position=learned"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "learned (apart from rope: position -> nothing)" in err
  assert run.main(["ladder", "--dry-run", "--config.model.position=learned"]) == 2
  err = capsys.readouterr().err
  assert "rope (apart from no_dropout: d_ff, position -> d_ff)" in err and "moe (total parameters against gqa" in err
  assert run.main(["ladder", "--dry-run", "--config.model.d_model=64"]) == 0
  args, rest = run._parser().parse_known_args(["context", "--allow-changed-runs", "--config.model.position=learned"])
  assert run._plan(args, rest)[2].changed_runs == ("learned (apart from rope: position -> nothing)",)


def test_the_runner_says_when_its_seeds_cannot_pass_the_sign_flip_test(capsys):
  assert run.main(["ladder", "--scale", "small", "--seeds", "3", "--dry-run"]) == 0  # 10 comparisons
  out = capsys.readouterr()
  assert "--seeds 9 can" in out.err and "cannot conclude" in out.out
  assert run.main(["ladder", "--scale", "small", "--dry-run"]) == 0  # the default: 9
  out = capsys.readouterr()
  assert "sign-flip" not in out.err and "Holm families at 9 seeds" in out.out and "cannot conclude" not in out.out


def test_finished_trainings_the_results_lack_are_kept_when_the_runner_starts(tmp_path):
  """A training that ended while the runner was being stopped was never kept: the next start keeps it."""
  sweep_dir, results = tmp_path / "sweep", tmp_path / "results"
  description = SweepDescription("s", "tiny", (RunSpec("a", steps=20),))
  _write_metrics(sweep_dir / "a" / "seed0", 2.0)  # finished
  _write_metrics(sweep_dir / "a" / "seed1", 2.0, steps=10)  # stopped at step 10 of 20
  description.save(sweep_dir / "sweep.json")
  assert sync.keep_unkept(sweep_dir, results, description) == 1
  assert (results / "a" / "seed0" / "metrics.jsonl").read_text() == (sweep_dir / "a" / "seed0" / "metrics.jsonl").read_text()
  assert not (results / "a" / "seed1").exists() and (results / "sweep.json").is_file()
  assert sync.keep_unkept(sweep_dir, results, description) == 0  # nothing kept twice


def test_kept_results_are_taken_back_unless_they_describe_other_trainings(tmp_path):
  """More compared seeds or a better FLOPs estimate describe the same trainings; another parameter count does not."""
  results = tmp_path / "results"
  _write_metrics(results / "a" / "seed0", 2.0)
  spec = RunSpec("a", steps=20, total_params=100, flops_per_token=600.0)
  kept = SweepDescription("s", "tiny", (spec,), seeds=8, lrs=(1e-3,))
  kept.save(results / "sweep.json")
  now = dataclasses.replace(kept, seeds=10, runs=(dataclasses.replace(spec, flops_per_token=594.0),))
  assert sync.take_kept(results, tmp_path / "sweep", now) == 1
  assert (tmp_path / "sweep" / "a" / "seed0" / "metrics.jsonl").is_file()
  other = dataclasses.replace(kept, runs=(dataclasses.replace(spec, total_params=101),))
  with pytest.raises(ConfigError, match="differs in runs"):
    sync.take_kept(results, tmp_path / "other", other)


def test_a_training_is_finished_only_once_its_test_losses_are_written(tmp_path):
  old = tmp_path / "old"  # from before the test split: the final validation loss is all there is
  _write_metrics(old, 2.0)
  (old / "config.json").write_text(json.dumps({"data": {"eval_fraction": 0.03}}))
  assert folders.finished(old, 20) and not folders.finished(old, 30)
  new = tmp_path / "new"
  _write_metrics(new, 2.0)
  (new / "config.json").write_text(json.dumps({"data": {"val_fraction": 0.03, "test_fraction": 0.03},
                                               "train": {"steps": 20}}))
  assert folders.finished(new, 10)  # stopped early (--config.train.stop_at): no test there
  assert not folders.finished(new, 20)  # killed between its validation and test evaluations
  with (new / "metrics.jsonl").open("a") as f:
    f.write(json.dumps({"step": 20, "test/loss": 2.1}) + "\n")
  assert not folders.finished(new, 20)  # killed before heldout.json
  (new / "heldout.json").write_text(json.dumps({"split": "test", "step": 20, "batch_losses": [2.1]}))
  assert folders.finished(new, 20)


def test_lr_choice_picks_the_lowest_loss_and_widens_at_an_edge():
  inside = folders.choose_lr({1e-3: 2.5, 3e-3: 2.3, 1e-2: 2.4})
  assert (inside.lr, inside.at_edge, inside.widen) == (3e-3, False, None)
  high = folders.choose_lr({1e-3: 2.5, 3e-3: 2.4, 1e-2: 2.3})
  assert (high.lr, high.at_edge) == (1e-2, True) and high.widen == pytest.approx(1e-2 * 1e-2 / 3e-3, rel=1e-2)
  low = folders.choose_lr({1e-3: 2.2, 3e-3: 2.4, 1e-2: 2.5})
  assert (low.lr, low.at_edge) == (1e-3, True) and low.widen == pytest.approx(1e-3 / 3, rel=1e-2)


def test_scheduler_chooses_on_the_mean_of_the_selection_seeds_widens_then_trains_seeds(tmp_path):
  sweep = sweeps.Sweep("ladder", "tiny", build("ladder", "tiny").runs[:1])
  description = SweepDescription("ladder", "tiny", (RunSpec("gpt2", steps=20),), seeds=2, lrs=(1e-3, 3e-3, 1e-2),
                                 selection_seeds=(1000, 1001))
  scheduler = plan.Scheduler(sweep, tmp_path, description)
  ready = lambda: sorted(str(j.folder.relative_to(tmp_path)) for j in scheduler.ready(set()))
  assert ready() == [f"gpt2/lr{lr}-seed{s}" for lr in ("0.001", "0.003", "0.01") for s in (1000, 1001)]
  # seed 1000 alone would choose 3e-3; the mean of both seeds is lowest at the upper edge, 1e-2
  for lr, losses in ((1e-3, (2.5, 2.5)), (3e-3, (2.30, 2.50)), (1e-2, (2.35, 2.35))):
    for seed, loss in zip((1000, 1001), losses):
      _write_metrics(folders.lr_dir(tmp_path, "gpt2", lr, seed), loss)
  assert scheduler.choice(sweep.runs[0]).losses == {1e-3: 2.5, 3e-3: 2.4, 1e-2: 2.35}
  assert ready() == ["gpt2/lr0.0333-seed1000", "gpt2/lr0.0333-seed1001"]  # widened on both seeds
  _write_metrics(tmp_path / "gpt2" / "lr0.0333-seed1000", 2.36)
  assert ready() == ["gpt2/lr0.0333-seed1001"]  # no choice before every seed has finished
  _write_metrics(tmp_path / "gpt2" / "lr0.0333-seed1001", 2.40)  # worse: 0.01 is inside the widened grid
  jobs = scheduler.ready(set())
  assert ready() == ["gpt2/seed0", "gpt2/seed1"] and {j.lr for j in jobs} == {1e-2}
  assert folders.selection_losses(tmp_path / "gpt2", 20, [1000, 1001])[0.0333] == {1000: 2.36, 1001: 2.40}


def test_a_scales_run_settings_are_checked_against_the_typed_config_when_defined():
  tiny = sweeps.SCALES["tiny"]
  with pytest.raises(ConfigError, match="train.stepz .*did you mean train.steps"):
    dataclasses.replace(tiny, run=tiny.run | {"train.stepz": 3})
  with pytest.raises(ConfigError, match="train.steps must be int"):
    dataclasses.replace(tiny, run=tiny.run | {"train.steps": "700"})
  assert tiny.overrides()["data"]["seq_len"] == tiny.run["data.seq_len"] == 128


def test_context_sweep_changes_positions_windows_and_sinks_only_and_has_seeds_for_its_family():
  sweep = build("context", "tiny")
  runs = {r.name: r for r in sweep.runs}
  T = sweeps.SCALES["tiny"].run["data.seq_len"]
  rope = runs["rope"].model
  assert rope.position == "rope" and not rope.sliding_window and not rope.attn_sinks and not rope.is_moe
  assert rope.max_seq_len == 8 * T  # learned positions get a table as long as the longest evaluation
  for name, want in [("learned", {"position": "learned"}), ("sinks", {"attn_sinks": True}),
                     ("window", {"sliding_window": T // 4}), ("window_eighth", {"sliding_window": T // 8})]:
    assert runs[name].model == rope.replace(**want) and runs[name].changes == tuple(want)
  assert runs["window_sinks"].model == runs["window"].model.replace(attn_sinks=True)
  assert runs["window"].model.sliding_layers == (True, False, True, False)  # alternate layers
  assert sweep.evaluation == "experiments.context" and build("ladder", "tiny").evaluation == ""


def _context_evaluations(runs, seeds: int) -> dict:
  """What experiments.context writes for each seed of each run (losses made up), as context.load returns it."""
  from experiments.context import MULTIPLES
  T = SCALES["tiny"].run["data.seq_len"]
  rng = np.random.default_rng(0)
  one = lambda: {"loss": 2 + rng.random()}  # noqa: E731
  return {r.name: {s: {"plain": {str(k * T): one() for k in MULTIPLES}, "stream": one(),
                       "yarn": {str(k * T): one() for k in MULTIPLES[1:]} if r.model.position == "rope" else {}}
                   for s in range(seeds)} for r in runs}


@pytest.mark.parametrize("added", [False, True])
def test_default_seeds_let_every_family_the_report_corrects_reach_a_verdict(added):
  """The runner's families are the report's own (the context sweep's comparisons on evaluations of every run
  and seed, counted as the report makes them); the default seeds are the fewest that can pass Holm in the
  largest (a plain loop), and a run added to the sweep (30 tests: 10 seeds no longer can) raises them."""
  from experiments import context
  sweep = build("context", "tiny")
  runs = sweep.runs + ((sweeps.Run("window_quarter_sinks", sweep.runs[3].model, ("attn_sinks",), "sinks"),)
                       if added else ())
  description = SweepDescription("context", "tiny", tuple(RunSpec(r.name, baseline=r.baseline) for r in runs), seeds=2)
  between, yarn = context.comparisons(_context_evaluations(runs, 2), description)
  compared = sum(1 for r in runs if r.baseline)
  assert list(power.families(runs, sweep.evaluation).values()) == [compared, len(between), len(yarn)]
  largest = max(compared, len(between), len(yarn))
  seeds = power.default_seeds(runs, sweep.evaluation, SCALES["tiny"].seeds)
  assert seeds == max(SCALES["tiny"].seeds, next(n for n in range(1, 30) if largest * 2 / 2 ** n <= 0.05))
  assert (len(between), seeds) == ((30, 11) if added else (25, 10)) and seeds == (sweep.seeds if not added else 11)


@pytest.mark.parametrize("scale", ["small", "gpu"])
def test_small_and_gpu_sweeps_default_to_seeds_that_can_conclude(scale):
  for name in sweeps.SWEEPS:
    sweep = build(name, scale)
    for m in power.families(sweep.runs, sweep.evaluation).values():
      assert paired.sign_flip_floor(sweep.seeds, m) <= 0.05


@pytest.mark.parametrize("name", list(power.SEED_SD))
def test_the_assumed_seed_noise_is_the_committed_tiny_sweeps(name):
  """power.SEED_SD: the median over a committed tiny sweep's comparisons of the sd of its paired differences."""
  _, results = report.load(Path(REPO) / "experiments" / "results" / f"{name}-tiny")
  by_name = {r.name: r for r in results}
  sds = [np.std([r.finals[s] - by_name[r.spec.baseline].finals[s] for s in r.finals], ddof=1)
         for r in results if r.spec.baseline]
  assert power.SEED_SD[name] == pytest.approx(np.median(sds), abs=5e-5)


def test_detectable_difference_against_closed_forms():
  """Where the sign-flip test is not binding (12 seeds, one test) the detectable difference is the t-test's at
  80% power (scipy's noncentral t); where seeds only just allow a verdict (9 seeds, 10 tests: every seed must
  agree) it is where all n agree with probability 0.8: sd * Phi^-1(0.8^(1/n))."""
  detectable, sd = power.detectable, 0.03
  n, crit = 12, scipy_stats.t.ppf(1 - 0.025, 11)
  t_power = lambda delta: scipy_stats.nct.sf(crit, 11, delta / sd * np.sqrt(n))  # noqa: E731
  t_only = next(d for d in np.arange(0.001, 0.1, 0.0001) if t_power(d) >= 0.8)
  assert detectable(n, 1, sd) == pytest.approx(t_only, rel=0.06)
  assert detectable(9, 10, sd) == pytest.approx(sd * scipy_stats.norm.ppf(0.8 ** (1 / 9)), rel=0.05)
  assert detectable(8, 10, sd) == np.inf  # 8 seeds cannot pass Holm over 10 tests


def test_scheduler_runs_the_sweeps_evaluation_after_each_compared_training(tmp_path):
  sweep = dataclasses.replace(build("context", "tiny"), runs=build("context", "tiny").runs[:1])
  description = SweepDescription("context", "tiny", (RunSpec("rope", steps=20),), seeds=2, lrs=(1e-3, 3e-3, 1e-2),
                                 selection_seeds=(1000, 1001))
  scheduler = plan.Scheduler(sweep, tmp_path, description)
  for lr, loss in ((1e-3, 2.5), (3e-3, 2.3), (1e-2, 2.4)):
    for seed in (1000, 1001):
      _write_metrics(folders.lr_dir(tmp_path, "rope", lr, seed), loss)
  assert {(j.folder.name, j.evaluate) for j in scheduler.ready(set())} == {("seed0", False), ("seed1", False)}
  for seed in (0, 1):
    _write_metrics(folders.run_dir(tmp_path, "rope", seed), 2.3)
  jobs = scheduler.ready(set())  # the selection trainings are never evaluated
  assert {(j.folder.name, j.evaluate) for j in jobs} == {("seed0", True), ("seed1", True)}
  assert supervise.evaluation_command(sweep, jobs[0].folder)[1:] == ["-m", "experiments.context", str(jobs[0].folder)]
  (folders.run_dir(tmp_path, "rope", 0) / folders.EVALUATION_FILE).write_text("{}")
  assert [j.folder.name for j in scheduler.ready(set())] == ["seed1"]
  assert "evaluation.json" in folders.SMALL_FILES  # kept with the training's small files


def test_report_of_a_sweep_evaluated_past_its_training_length(tmp_path):
  """The `context` section: means per length, each run against its baseline at every length and streamed (one
  Holm family), YaRN against plain (another), the loss-by-position figure."""
  _fake_sweep(tmp_path, {"rope": [2.0] * 8, "sinks": [2.0] * 8}, {"sinks": "rope"})
  rng = np.random.default_rng(0)
  plain = {"rope": {"8": 2.0, "16": 2.5}, "sinks": {"8": 2.0, "16": 2.2}}
  for name in plain:
    for seed in range(8):
      noisy = {n: v + rng.normal(0, 0.01) for n, v in plain[name].items()}
      result = lambda loss, n: {"loss": loss, "seq_len": int(n), "stream_cache": 0,
                                "by_position": [{"from": 0, "to": 1, "loss": loss}, {"from": 1, "to": int(n), "loss": loss}]}
      evaluation = {"seq_len": 8, "plain": {n: result(v, n) for n, v in noisy.items()},
                    "yarn": {"16": result(noisy["16"] - 0.3, "16")},
                    "stream": result(noisy["16"] + 0.1, "16") | {"stream_cache": 8}}
      (tmp_path / name / f"seed{seed}" / "evaluation.json").write_text(json.dumps(evaluation))
  assert report.main([str(tmp_path), "--no-baselines"]) == 0
  text = (tmp_path / "report.md").read_text()
  means = _table(text, "| run | seeds | 8 | 16 | YaRN 16 | streamed |")
  values = [json.loads((tmp_path / "rope" / f"seed{s}" / "evaluation.json").read_text()) for s in range(8)]
  assert means["rope"][3] == f"{np.mean([v['plain']['16']['loss'] for v in values]):.4f} ± " \
                             f"{np.std([v['plain']['16']['loss'] for v in values], ddof=1):.4f}"
  section = text[text.index("## Past the training length"):]
  lines = [line for line in section.splitlines() if line.startswith("| sinks | rope |")]
  assert [line.split(" | ")[2] for line in lines] == ["8", "16", "streamed"]  # a family of 3
  at_16 = lines[1].split(" | ")
  assert float(at_16[4]) == pytest.approx(-0.3, abs=0.02) and "distinguishable: better" in lines[1]
  assert "distinguishable" in lines[0] and "not distinguishable" in lines[0]  # equal at the training length
  yarn = [line for line in text.splitlines() if line.startswith("| rope | rope without YaRN | 16 |")]
  assert len(yarn) == 1 and float(yarn[0].split(" | ")[4]) == pytest.approx(-0.3, abs=1e-9)
  assert (tmp_path / "loss_by_position.png").read_bytes()[:4] == b"\x89PNG"


def test_report_compares_harness_scores_seed_by_seed_in_a_family_of_their_own(tmp_path):
  """Benchmark scores (harness.json per compared training) as paired comparisons: Δ = run - baseline per task
  and metric, Holm over their own family (not the final losses'), the verdict in the metric's direction; at
  tiny scale the report says why there are none."""
  _fake_sweep(tmp_path, {"base": list(BASE_LOSSES), "a": list(BASE_LOSSES - 0.1)}, {"a": "base"})
  description = json.loads((tmp_path / "sweep.json").read_text())
  (tmp_path / "sweep.json").write_text(json.dumps(description | {"scale": "small"}))
  rng = np.random.default_rng(1)
  acc = {"base": 0.40 + rng.normal(0, 0.01, 8), "a": 0.45 + rng.normal(0, 0.01, 8)}  # a: better on every seed
  bpb = {"base": 1.0 + rng.normal(0, 0.02, 8), "a": 1.0 + rng.normal(0, 0.02, 8)}  # nothing
  for run in ("base", "a"):
    for seed in range(8):
      (tmp_path / run / f"seed{seed}" / "harness.json").write_text(json.dumps(
          {"mc": {"acc": acc[run][seed], "acc_stderr": 0.02, "higher_is_better": {"acc": True}},
           "text": {"bits_per_byte": bpb[run][seed], "higher_is_better": {"bits_per_byte": False}}}))
  assert report.main([str(tmp_path), "--no-baselines", "--harness-tasks", "mc,text"]) == 0  # nothing left to score
  rows = {(r[0], r[1]): r for r in _table_rows((tmp_path / "report.md").read_text(), "| task | metric | better |")}
  assert set(rows) == {("mc", "acc"), ("text", "bits_per_byte")}  # the stderr is not compared
  p = {}
  for (task, metric), values in (("mc", "acc"), acc), (("text", "bits_per_byte"), bpb):
    d = values["a"] - values["base"]
    row = rows[(task, metric)]
    assert row[5:8] == ["8", f"{d.mean():+.4f}", f"[{d.mean() - scipy_stats.t.ppf(0.975, 7) * d.std(ddof=1) / np.sqrt(8):+.4f}, "
                                                 f"{d.mean() + scipy_stats.t.ppf(0.975, 7) * d.std(ddof=1) / np.sqrt(8):+.4f}]"]
    p[metric] = (float(row[8]), float(row[9]))
  holm = _plain_holm({k: v[1] for k, v in p.items()})  # sign-flip, over these two tests only
  assert float(rows[("mc", "acc")][11]) == pytest.approx(holm["acc"], rel=0.01)
  assert rows[("mc", "acc")][2] == "higher" and rows[("mc", "acc")][-1] == "**distinguishable: better**"
  assert rows[("text", "bits_per_byte")][-1] == "not distinguishable"
  bullet = next(line for line in (tmp_path / "report.md").read_text().splitlines() if "**Benchmark tasks**" in line)
  assert f"better: `a` vs `base` mc acc {(acc['a'] - acc['base']).mean():+.4f}. worse: none" in bullet
  (tmp_path / "sweep.json").write_text(json.dumps(description))  # tiny
  assert report.main([str(tmp_path), "--no-baselines", "--harness-tasks", "mc"]) == 0
  assert "Not scored at `tiny` scale: its models read bytes of Shakespeare" in (tmp_path / "report.md").read_text()


def _table_rows(text: str, header: str) -> list[list[str]]:
  """Rows of the markdown table whose header row starts with `header` (several may share a first cell)."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header))
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("| "):
      break
    rows.append([c.strip() for c in line.strip("|").split("|")])
  return rows


def test_report_pairs_mxfp4_losses_with_the_trained_ones_seed_by_seed(tmp_path):
  _fake_sweep(tmp_path, {"dense": [2.0] * 8, "moe": [2.0] * 8}, {"moe": "dense"}, experts={"moe": (8, 2)})
  costs = np.linspace(0.004, 0.006, 8)
  for seed, extra in enumerate(costs):
    (tmp_path / "moe" / f"seed{seed}" / "mxfp4.json").write_text(json.dumps(
        {"loss": 2.0 + seed / 100, "mxfp4_loss": 2.0 + seed / 100 + extra, "moe_layers": 2, "d_model": 48, "d_expert": 40}))
  assert report.main([str(tmp_path), "--no-baselines"]) == 0
  text = (tmp_path / "report.md").read_text()
  row = _table(text, "| run | trained loss |")["moe"]
  assert float(row[1]) == pytest.approx(2.035) and int(row[2]) == 8 and float(row[3]) == pytest.approx(costs.mean())
  assert "distinguishable: worse" in row[-1] and "d_model 48" in text and "dense" not in _table(text, "| run | trained loss |")


def test_report_flags_a_learning_rate_at_the_edge_and_shows_router_health(tmp_path):
  _fake_sweep(tmp_path, {"dense": [2.0, 2.1], "moe": [2.2, 2.3]}, {"moe": "dense"},
              grids={"dense": {1e-3: 2.5, 3e-3: 2.3, 1e-2: 2.4}, "moe": {1e-3: 2.5, 3e-3: 2.4, 1e-2: 2.3}},
              experts={"moe": (8, 2)})
  (tmp_path / "moe" / "seed1" / "metrics.jsonl").write_text(json.dumps({"step": 10, "eval/loss": 3.0}) + "\n")
  assert report.main([str(tmp_path), "--out", str(tmp_path / "out"), "--no-baselines"]) == 0
  text = (tmp_path / "out" / "report.md").read_text()
  lrs = _table(text, "| run | chosen |")
  assert lrs["dense"][1] == "0.003" and lrs["dense"][3] == ""
  assert lrs["moe"][1] == "0.01" and "edge of the grid" in lrs["moe"][3]
  main = _table(text, "| run | changes | lr |")
  assert main["dense"][2:5] == ["0.003", "2.0500 ± 0.0707", "[2.0000, 2.1000]"]
  assert main["moe"][3] == "2.2000" and main["dense"][7:9] == ["2.6", "1.3"]  # one seed finished; tokens/param
  health = _table(text, "| run | experts, top-k |")
  assert health["moe"][1:7] == ["8, 2", "0.01, 0.001, 0.003", "2.00", "4.0", "0.800", "0.000"]  # worst layer
  assert health["moe"][7] == "0"  # 2.00 is half of collapse (8 / 2 / 2), not past it
  _, results = report.load(tmp_path)
  loads = {r.name: r.load_curves for r in results}
  assert loads["dense"] == {} and loads["moe"][0] == [(10, 2.0), (20, 2.0)]  # the worst layer at each logged step
  assert (tmp_path / "out" / "router_health.png").read_bytes()[:4] == b"\x89PNG"
  assert "`moe` vs `dense`" not in text  # one common seed: no comparison


def test_report_flags_a_comparison_whose_sign_changes_across_shared_learning_rates(tmp_path):
  _fake_sweep(tmp_path, {"gelu": [2.0, 2.1, 2.05], "swiglu": [2.1, 2.2, 2.1], "rms": [2.0, 2.1, 2.0]},
              {"swiglu": "gelu", "rms": "gelu"},
              grids={"gelu": {1e-3: 2.5, 3e-3: 2.3, 1e-2: 2.4, 3e-2: 2.9}, "swiglu": {1e-3: 2.4, 3e-3: 2.2, 1e-2: 2.6},
                     "rms": {1e-3: 2.45, 3e-3: 2.25, 1e-2: 2.35}})
  assert report.main([str(tmp_path), "--no-baselines"]) == 0
  rows = _table((tmp_path / "report.md").read_text(), "| run | vs | Δ at each shared")
  assert rows["swiglu"][2] == "0.001: -0.1000, 0.003: -0.1000, 0.01: +0.2000"  # 3e-2: gelu's alone
  assert rows["swiglu"][3] == "**learning-rate sensitive**" and rows["rms"][3] == ""


def test_router_health_over_the_whole_run():
  spec = RunSpec("moe", n_experts=8, top_k=2)  # collapse 4, half of it 2
  r = report.Result("moe", spec, {}, {}, 0.0, {}, {}, {}, 0.0, 0.0, 0.0,
                    load_curves={0: [(5, 3.9), (10, 3.0), (20, 1.5), (30, 1.2)], 1: [(5, 3.9), (10, 1.8), (20, 2.4),
                                                                                   (30, 1.1)]}, warmup=5)
  over = r.router_over_run()
  assert over["past_half_share"] == pytest.approx((2 / 4 + 2 / 4) / 2)  # 3.9, 3.0 | 3.9, 2.4
  assert over["past_half_share_worst_seed"] == pytest.approx(0.5)
  assert over["largest_after_warmup"] == pytest.approx(3.0 / 4)  # step 5 is warm-up


def test_mini_sweep_end_to_end_resumes_and_skips(tmp_path, text_dataset):
  sweep_dir = tmp_path / "sweep"
  common = [sys.executable, "-m", "experiments.run", "ladder", "--runs", "no_dropout", "--seeds", "2",
            "--lrs", "1e-3,3e-3", "--widen", "0", "--jobs", "2", "--workdir", str(sweep_dir), "--config.train.steps=4",
            "--config.train.eval_every=2", "--config.log.every=2", "--config.train.batch_size=4",
            "--config.data.seq_len=32", f"--config.data.dir={text_dataset}", "--config.train.eval_batches=2",
            "--config.train.warmup_steps=1"]
  env = os.environ | {"XLA_FLAGS": COMPILE_FLAGS}
  cwd = tmp_path  # the commands work from any directory
  first = subprocess.run(common + ["--config.train.stop_at=2"], capture_output=True, text=True, env=env, cwd=cwd)
  assert first.returncode == 0, first.stderr[-2000:]
  folder = sweep_dir / "no_dropout"
  grid_names = ["lr0.001-seed1000", "lr0.001-seed1001", "lr0.003-seed1000", "lr0.003-seed1001"]
  assert sorted(p.name for p in folder.iterdir()) == grid_names  # seeds wait for the grid
  assert all(folders.last_step(folder / name) == 2 for name in grid_names)
  stopped = shutil.copytree(folder / grid_names[0], tmp_path / "stopped")
  second = subprocess.run(common, capture_output=True, text=True, env=env, cwd=cwd)
  assert second.returncode == 0, second.stderr[-2000:]
  assert "resumed from step 2" in (folder / "lr0.001-seed1000" / "train.log").read_text()
  grid = {lr: np.mean(list(v.values())) for lr, v in folders.selection_losses(folder, 4, [1000, 1001]).items()}
  chosen = folders.choose_lr(grid)
  assert set(grid) == {1e-3, 3e-3}  # --widen 0: an edge is flagged, not widened
  for seed in (0, 1):
    config = json.loads((folder / f"seed{seed}" / "config.json").read_text())
    assert config["train"]["lr"] == chosen.lr and config["train"]["seed"] == seed
    assert [r["step"] for r in folders.metrics(folder / f"seed{seed}") if "eval/loss" in r] == [2, 4]
  third = subprocess.run(common, capture_output=True, text=True, env=env, cwd=cwd)
  assert third.returncode == 0 and sorted(p.name for p in folder.iterdir()) == grid_names + ["seed0", "seed1"]
  assert (folder / "seed0" / "train.log").read_text().count("done:") == 1  # the third call trained nothing
  assert report.main([str(sweep_dir)]) == 0
  text = (sweep_dir / "report.md").read_text()
  assert "| no_dropout | embed_dropout" in text and "## Count-based baselines" in text
  kept = json.loads((sweep_dir / "ngram.json").read_text())  # counted once, on the sweep's own dataset
  assert kept["seen_tokens"] == 4 * 4 * 32 and set(kept["seen"]) == {str(n) for n in range(1, 9)}
  events = list((folder / "seed0" / "tb").glob("events.out.tfevents.*"))
  assert any(b"hparams" in e.read_bytes() for e in events)
  # the dry-run's disk estimates against real files: a finished training's final weights alone, and a training
  # stopped at step 2 (a whole checkpoint with Adam's moments)
  on_disk = lambda f: sum(f.stat().st_size for f in (f / "checkpoints").rglob("*") if f.is_file())
  params = SweepDescription.load(sweep_dir / "sweep.json").run("no_dropout").total_params
  assert 0.9 < on_disk(folder / "seed0") / (cost.WEIGHT_BYTES_PER_PARAM * params) < 1.3
  assert 0.9 < on_disk(stopped) / (cost.STATE_BYTES_PER_PARAM * params) < 1.3


def test_tensorboard_export_has_what_a_comparison_needs(tmp_path):
  """Two runs: HParams name the run, the fields the sweep varies and the parameter counts (integers as
  whole numbers), the seeds of a run share a session group; the layout is written."""
  from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
  from test_train import _read_events
  _fake_sweep(tmp_path, {"dense": [2.0, 2.1], "wide": [1.9, 2.0]}, {"wide": "dense"})
  description = json.loads((tmp_path / "sweep.json").read_text())
  description["runs"][0]["changes"], description["runs"][1]["changes"] = [], ["d_model", "n_heads"]
  description["runs"][1]["total_params"] = 123_456
  (tmp_path / "sweep.json").write_text(json.dumps(description))
  for run_name, width in (("dense", 48), ("wide", 64)):
    for seed in (0, 1):
      (tmp_path / run_name / f"seed{seed}" / "config.json").write_text(json.dumps(
          {"model": {"d_model": width, "n_heads": 4, "x": 1}, "train": {"seed": seed, "lr": 0.003}}))
  assert report.main([str(tmp_path), "--tensorboard", "--no-baselines"]) == 0
  assert report.main([str(tmp_path), "--tensorboard", "--no-baselines"]) == 0  # written anew, not added to
  assert len(list((tmp_path / "tb" / "wide" / "seed0").glob("events.out.tfevents.*"))) == 1
  sessions = {}
  for run_name in ("dense", "wide"):
    for seed in (0, 1):
      for event in _read_events(tmp_path / "tb" / run_name / f"seed{seed}"):
        for value in event.summary.value:
          if value.tag == "_hparams_/session_start_info":
            info = HParamsPluginData.FromString(value.metadata.plugin_data.content).session_start_info
            sessions[(run_name, seed)] = (info.group_name, dict(info.hparams))
  assert set(sessions) == {("dense", 0), ("dense", 1), ("wide", 0), ("wide", 1)}
  group, hp = sessions[("wide", 1)]
  assert group == sessions[("wide", 0)][0] == "wide" != sessions[("dense", 0)][0]
  assert hp["run"].string_value == "wide" and hp["sweep"].string_value == "fake-tiny"
  assert hp["d_model"].number_value == 64 and hp["n_heads"].number_value == 4 and "x" not in hp
  assert hp["total_params"].number_value == 123_456 and hp["seed"].number_value == 1
  assert all(hp[k].number_value.is_integer() for k in ("total_params", "active_params", "seed", "d_model"))
  [experiment] = [HParamsPluginData.FromString(v.metadata.plugin_data.content).experiment
                  for e in _read_events(tmp_path / "tb" / "wide" / "seed0") for v in e.summary.value
                  if v.tag == "_hparams_/experiment"]
  # TensorBoard's table shows the fields marked as differing first: what the sweep varies, and the lr
  differs = bytes([7 << 3, 1])  # HParamInfo.differs = true: field 7 of TensorBoard's proto (not in tensorboardX's)
  assert {i.name for i in experiment.hparam_infos if i.SerializeToString().endswith(differs)} == {"d_model", "n_heads", "lr"}
  tags = {v.tag for e in _read_events(tmp_path / "tb" / "wide" / "seed0") for v in e.summary.value}
  assert {"eval/loss", "train/loss", "train/tokens"} <= tags
  assert any(e.summary.value and e.summary.value[0].tag == "custom_scalars__config__" for e in _read_events(tmp_path / "tb"))


def test_each_training_gets_its_own_gpus_and_shares_memory_only_when_it_shares_a_gpu(monkeypatch):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
  eight = [str(i) for i in range(8)]
  one_each = slots.slots(8, 1, eight)
  assert [s.env for s in one_each] == [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(8)]  # no memory cap
  assert all(len(s.cpus) == 2 for s in one_each) and len(set().union(*(s.cpus for s in one_each))) == 16
  pairs = slots.slots(4, 2, eight)
  assert [s.env["CUDA_VISIBLE_DEVICES"] for s in pairs] == ["0,1", "2,3", "4,5", "6,7"]
  shared = slots.slots(3, 1, ["0"])  # three trainings on one GPU: each a third of its memory, not 75%
  assert {s.env["CUDA_VISIBLE_DEVICES"] for s in shared} == {"0"}
  assert {s.env["XLA_PYTHON_CLIENT_MEM_FRACTION"] for s in shared} == {"0.300"}
  assert [s.env for s in slots.slots(2, 1, [])] == [{}, {}]  # CPU: cores only
  with pytest.raises(ConfigError, match="devices-per-job 3 is more than the 2 GPUs"):
    slots.slots(1, 3, ["0", "1"])
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
  assert slots.visible_gpus() == ["3", "5"]


def test_a_tpu_host_runs_one_training_at_a_time(monkeypatch, capsys):
  monkeypatch.setattr(run, "tpu_host", lambda: True)
  assert run.main(["ladder", "--jobs", "2", "--dry-run"]) == 2
  assert "TPU host" in capsys.readouterr().err
  assert run.main(["ladder", "--jobs", "1", "--dry-run"]) == 0
  monkeypatch.setenv("TPU_VISIBLE_CHIPS", "0,1")  # the chips split by hand: the user's call
  assert run.main(["ladder", "--jobs", "2", "--dry-run"]) == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_runners_process_group_stops_every_training_with_its_checkpoint(tmp_path, text_dataset, sig):
  """Ctrl-C in the terminal (SIGINT) or a scheduler's SIGTERM to the whole process group, while the trainings
  write a checkpoint every step: each training gets one stop request (before, it got the signal and then the
  runner's SIGINT, a second Ctrl-C: it stopped at once, without its checkpoint), saves and exits; the same
  command resumes them."""
  sweep_dir = tmp_path / "sweep"
  cmd = [sys.executable, "-m", "experiments.run", "ladder", "--runs", "no_dropout", "--seeds", "2", "--lrs", "1e-3",
         "--jobs", "2", "--workdir", str(sweep_dir), "--config.train.steps=100000", "--config.train.eval_every=100000",
         "--config.log.every=1", "--config.checkpoint.every=1", "--config.train.batch_size=4",
         "--config.data.seq_len=32", f"--config.data.dir={text_dataset}", "--config.train.eval_batches=1",
         "--config.train.warmup_steps=1"]
  env = os.environ | {"XLA_FLAGS": COMPILE_FLAGS}
  runner = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal or a scheduler gives it
  deadline = time.time() + 240
  while min((folders.last_step(sweep_dir / "no_dropout" / f"seed{s}") for s in (0, 1)), default=0) < 2:
    assert time.time() < deadline and runner.poll() is None, runner.communicate()
    time.sleep(0.2)
  os.killpg(runner.pid, sig)
  _, err = runner.communicate(timeout=120)
  assert runner.returncode == 130 and "run the same command again to resume" in err
  for seed in (0, 1):
    log = (sweep_dir / "no_dropout" / f"seed{seed}" / "train.log").read_text()
    assert "stopped by signal" in log  # each training saved a checkpoint and exited
    assert any((sweep_dir / "no_dropout" / f"seed{seed}" / "checkpoints").iterdir())
  if sig == signal.SIGTERM:
    return  # what was saved resumes alike after either signal: resumed once, after Ctrl-C
  stopped = max(folders.last_step(sweep_dir / "no_dropout" / f"seed{s}") for s in (0, 1))
  again = subprocess.run(cmd + [f"--config.train.stop_at={stopped + 2}"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "resumed from step" in (sweep_dir / "no_dropout" / "seed0" / "train.log").read_text()


def test_smoke_trains_the_small_scales_gpt_oss_style_run_at_its_real_shapes(tmp_path):
  """--smoke: the last ladder rung of the small scale (MoE, sliding window, sinks, biases, GPT-2's padded
  vocabulary, bfloat16) for 2 steps on 8 fake CPU devices from a local corpus, through checkpoint and report.
  The other runs and the gpu scale take the same path (`python -m experiments.run <sweep> --scale S --smoke`)."""
  out = subprocess.run([sys.executable, "-m", "experiments.run", "ladder", "--scale", "small", "--smoke", "--runs",
                        "attention_biases", "--workdir", str(tmp_path / "smoke")], cwd=REPO, capture_output=True,
                       text=True, env=os.environ | {"XLA_FLAGS": ""}, timeout=900)  # real shapes: LLVM's passes pay
  assert out.returncode == 0, out.stderr[-2000:]
  folder = tmp_path / "smoke" / "attention_biases" / "seed0"
  config = json.loads((folder / "config.json").read_text())
  assert config["model"]["vocab_size"] == 50304 and config["model"]["d_model"] == 384
  assert config["data"]["tokenizer"] == "gpt2" and config["train"]["steps"] == 2
  assert (config["mesh"]["data"], config["mesh"]["fsdp"]) == (1, -1)  # the state sharded over the fake devices
  assert "x 8 devices" in (folder / "train.log").read_text()  # the 8-device mesh
  assert [r["step"] for r in folders.metrics(folder) if "test/loss" in r] == [2] and any((folder / "checkpoints").iterdir())
  assert "| attention_biases |" in (tmp_path / "smoke" / "report.md").read_text()


def test_the_readmes_result_tables_equal_the_committed_reports(tmp_path):
  from experiments import readme
  for name in ("README.md", "docs/results.md"):
    path = Path(REPO) / name
    for where, body, want in readme.blocks(path.read_text(), path.parent):
      assert body == want, (f"{name}'s table from {where} differs from the report: run python -m experiments.report "
                            f"--readme README.md docs/results.md")
  text = (Path(REPO) / "docs" / "results.md").read_text()
  found = readme.blocks(text, Path(REPO) / "docs")
  assert len(found) >= 6  # two tables of each of the three sweeps
  # and the check can fail: a figure changed in a copy is caught, and --readme puts it back
  (tmp_path / "docs").mkdir()
  copy = tmp_path / "docs" / "results.md"
  copy.write_text(text.replace(found[0][2], found[0][2][:-1] + " x\n", 1))
  (tmp_path / "experiments").symlink_to(Path(REPO) / "experiments")
  assert any(body != want for _, body, want in readme.blocks(copy.read_text(), tmp_path / "docs"))
  assert report.main(["--readme", str(copy)]) == 0 and copy.read_text() == text
