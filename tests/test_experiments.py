"""Sweeps expand to the intended configs, the solvers meet their budgets, the report reads metric files,
and a mini sweep runs end to end through the training command."""

import json
import os
import subprocess
import sys

import pytest

from experiments import report, run, sweeps
from experiments.sweeps import SCALES, active, build, solve, total
from gptoss_jax.config import ModelConfig, apply_overrides, load_config_file

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
  expected = {"no_dropout": {"embed_dropout", "attn_dropout", "resid_dropout"}, "rope": {"position"},
              "rmsnorm": {"norm"}, "no_biases": {"qkv_bias", "out_bias", "ffn_bias"}, "swiglu": {"ffn", "d_ff"},
              "gqa": {"n_kv_heads"}, "moe": {"n_experts", "top_k", "d_expert", "router_bias"},
              "sliding_window": {"sliding_window"}, "sinks": {"attn_sinks"},
              "attention_biases": {"qkv_bias", "out_bias"}}
  assert {r.name: set(r.changes) for r in ladder[1:]} == expected


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


def test_width_depth_lands_within_two_percent_of_the_budget(ladder):
  budget = total(ladder[-1].model)
  runs = build("width_depth", "tiny").runs
  assert [r.model.n_layers for r in runs] == list(TINY.depths)
  widths = [r.model.d_model for r in runs]
  assert widths == sorted(widths, reverse=True) and len(set(widths)) == len(widths)
  for r in runs:
    assert abs(total(r.model) / budget - 1) <= 0.02, r.name
    assert r.model.n_heads * r.model.head_dim == r.model.d_model
    assert changed(ladder[-1].model, r.model) <= {"n_layers", "d_model", "head_dim", "d_expert"}


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


def test_overrides_rebuild_each_run_through_the_command_line_parser(ladder):
  sweep = build("ladder", "tiny")
  for r in (ladder[0], ladder[7], ladder[-1]):
    config = load_config_file(str(sweeps.REPO / sweeps.BASE_CONFIG))
    apply_overrides(config, sweep.overrides(r, seed=2))
    assert ModelConfig.from_dict(config.model) == r.model
    assert config.train.seed == 2 and config.train.steps == TINY.run["train.steps"]


def test_dry_run_prints_every_run_and_trains_nothing(tmp_path, capsys):
  assert run.main(["experts", "--dry-run", "--workdir", str(tmp_path / "sweep")]) == 0
  out = capsys.readouterr().out
  for name in ("dense", "e4_k1", "e64_k4", "e16_k4"):
    assert f"\n{name} " in out
  assert not (tmp_path / "sweep").exists()


def test_bad_sweep_arguments_get_one_line_and_status_2(capsys):
  assert run.main(["nope"]) == 2
  assert run.main(["ladder", "--runs", "gpt2,nope"]) == 2
  assert run.main(["ladder", "--config.train.nope=1"]) == 2
  assert run.main(["ladder", "--config.model.n_kv_heads=3"]) == 2  # 4 heads do not divide into 3
  errors = capsys.readouterr().err.strip().splitlines()
  assert len(errors) == 4 and all(e.startswith("error: ") for e in errors)


def _fake_sweep(folder, finals: dict[str, list[float]], baselines: dict[str, str]):
  runs = []
  for name, values in finals.items():
    runs.append({"name": name, "changes": ["x"], "baseline": baselines.get(name, ""), "note": "",
                 "total_params": 1000, "active_params": 500, "flops_per_token": 3000.0, "steps": 20,
                 "stop_at": 0, "tokens_per_step": 64})
    for seed, final in enumerate(values):
      d = folder / name / f"seed{seed}"
      d.mkdir(parents=True)
      rows = [{"step": s, "train/loss": 5.0, "perf/tokens_per_s": 100.0 * (s // 10), "perf/peak_memory_gb": 0.5,
               "perf/elapsed_s": 2.0 * s} for s in (10, 20)]
      rows += [{"step": 10, "eval/loss": final + 1.0}, {"step": 20, "eval/loss": final}]
      (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (folder / "sweep.json").write_text(json.dumps({"sweep": "fake", "scale": "tiny", "seeds": 3, "overrides": {},
                                                 "runs": runs}))


def test_report_from_fabricated_metrics(tmp_path):
  _fake_sweep(tmp_path, {"a": [3.0, 3.1, 3.2], "b": [2.5, 2.6, 2.7], "c": [2.55, 2.8, 2.9]},
              {"b": "a", "c": "b"})
  assert report.main([str(tmp_path)]) == 0
  text = (tmp_path / "report.md").read_text()
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
  rows = {row[0]: row for row in cells}
  assert rows["a"][2] == "3.1000 ± 0.1000" and rows["a"][3] == "[3.0000, 3.2000]" and rows["a"][4] == "-"
  assert rows["b"][2] == "2.6000 ± 0.1000" and rows["b"][4:7] == ["a", "-0.5000", "**yes**"]
  assert rows["c"][4:7] == ["b", f"{(2.55 + 2.8 + 2.9) / 3 - 2.6:+.4f}", "no"]  # ranges overlap
  assert rows["a"][10:13] == ["200", "0.50", "40"]  # tokens/s without the first interval; peak; wall
  assert "- `b` vs `a`: -0.5000 (better)" in text
  assert "`c` vs `b`" in text.split("Within the spread")[1]
  for png in ("loss_vs_steps.png", "loss_vs_flops.png", "final_loss.png"):
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_report_compares_with_the_best_run_and_flags_unfinished(tmp_path):
  _fake_sweep(tmp_path, {"wide": [2.0, 2.1], "deep": [2.5, 2.6]}, {"wide": "best", "deep": "best"})
  (tmp_path / "deep" / "seed1" / "metrics.jsonl").write_text(json.dumps({"step": 10, "eval/loss": 3.0}) + "\n")
  assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
  text = (tmp_path / "out" / "report.md").read_text()
  assert "| wide | x | 2.0500 ± 0.0707 | [2.0000, 2.1000] | - |" in text
  assert "| deep | x | 2.5000 | [2.5000, 2.5000] | wide | +0.4500 | n/a |" in text  # one seed finished


def test_mini_sweep_end_to_end_resumes_and_skips(tmp_path, text_dataset):
  sweep_dir = tmp_path / "sweep"
  common = [sys.executable, "-m", "experiments.run", "ladder", "--runs", "gpt2,no_dropout", "--seeds", "1",
            "--workdir", str(sweep_dir), "--config.train.steps=4", "--config.train.eval_every=2",
            "--config.log.every=2", "--config.train.batch_size=4", "--config.data.seq_len=32",
            f"--config.data.dir={text_dataset}", "--config.train.eval_batches=2"]
  env = os.environ | {"XLA_FLAGS": ""}
  cwd = sweeps.REPO
  first = subprocess.run(common + ["--config.train.stop_at=2"], capture_output=True, text=True, env=env, cwd=cwd)
  assert first.returncode == 0, first.stderr[-2000:]
  assert all(run.last_step(sweep_dir / name / "seed0") == 2 for name in ("gpt2", "no_dropout"))
  second = subprocess.run(common, capture_output=True, text=True, env=env, cwd=cwd)
  assert second.returncode == 0, second.stderr[-2000:]
  assert "resumed from step 2" in (sweep_dir / "gpt2" / "seed0" / "train.log").read_text()
  steps = [r["step"] for r in run.metrics(sweep_dir / "gpt2" / "seed0") if "eval/loss" in r]
  assert steps == [2, 4]
  third = subprocess.run(common, capture_output=True, text=True, env=env, cwd=cwd)
  assert third.returncode == 0 and "2 finished already" in third.stderr
  assert report.main([str(sweep_dir)]) == 0
  text = (sweep_dir / "report.md").read_text()
  assert "| gpt2 |" in text and "| no_dropout |" in text and "| no_dropout | embed_dropout" in text
  # one TensorBoard logdir per sweep: every run's events under the sweep folder, with HParams
  for name in ("gpt2", "no_dropout"):
    events = list((sweep_dir / name / "seed0" / "tb").glob("events.out.tfevents.*"))
    assert any(b"hparams" in e.read_bytes() for e in events), name
