"""python -m experiments.run <sweep> --scale tiny [--seeds N] [--workdir DIR] [--dry-run] [--runs a,b]
[--config.a.b=value ...]

Runs every run of a sweep through the training command, each in DIR/<run>/seed<k>; a second call
skips finished runs and resumes unfinished ones. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from experiments.sweeps import BASE_CONFIG, REPO, SCALES, SWEEPS, Run, Sweep, build
from gptoss_jax.config import ConfigError, ModelConfig, apply_overrides, load_config_file, parse_override_args
from gptoss_jax.inspect import stats


def run_dir(sweep_dir: Path, run: str, seed: int) -> Path:
  return sweep_dir / run / f"seed{seed}"


def metrics(folder: Path) -> list[dict]:
  path = folder / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def last_step(folder: Path) -> int:
  return max((r["step"] for r in metrics(folder)), default=0)


def finished(folder: Path, steps: int) -> bool:
  """The run reached its last step and evaluated there (the loop always evaluates its final step)."""
  return any(r["step"] >= steps and "eval/loss" in r for r in metrics(folder))


def command(sweep: Sweep, run: Run, seed: int, folder: Path, extra: dict[str, str]) -> list[str]:
  overrides = sweep.overrides(run, seed) | extra | {"log.progress": "false"}
  return ([sys.executable, "-m", "gptoss_jax.train", "--config", str(REPO / BASE_CONFIG), "--workdir", str(folder)]
          + [f"--config.{k}={v}" for k, v in overrides.items()])


def describe(sweep: Sweep, extra: dict[str, str], seeds: int) -> dict:
  """sweep.json: what the report needs besides the metrics. Resolving every run's config here also
  checks the command-line overrides before anything trains."""
  runs = []
  for run in sweep.runs:
    config = load_config_file(str(REPO / BASE_CONFIG))
    apply_overrides(config, sweep.overrides(run, 0) | extra)
    s = stats(ModelConfig.from_dict(config.model), config.data.seq_len)
    runs.append({"name": run.name, "changes": list(run.changes), "baseline": run.baseline, "note": run.note,
                 "total_params": s.total_params, "active_params": s.active_params,
                 "flops_per_token": s.train_flops_per_token, "steps": config.train.steps,
                 "stop_at": config.train.stop_at,
                 "tokens_per_step": config.train.batch_size * config.data.seq_len})
  return {"sweep": sweep.name, "scale": sweep.scale, "seeds": seeds, "overrides": extra, "runs": runs}


def table(description: dict) -> str:
  lines = [f"{'run':<18} {'changes':<44} {'params':>10} {'active':>10} {'train FLOPs/token':>18}"]
  for r in description["runs"]:
    lines.append(f"{r['name']:<18} {','.join(r['changes']) or '-':<44.44} {r['total_params']:>10,} "
                 f"{r['active_params']:>10,} {r['flops_per_token']:>18,.0f}")
  return "\n".join(lines)


def execute(sweep: Sweep, sweep_dir: Path, description: dict, extra: dict[str, str]) -> list[str]:
  """Trains every unfinished (run, seed); returns the names of the ones that failed."""
  sweep_dir.mkdir(parents=True, exist_ok=True)
  (sweep_dir / "sweep.json").write_text(json.dumps(description, indent=1))
  specs = {r["name"]: r for r in description["runs"]}
  jobs = [(run, seed, run_dir(sweep_dir, run.name, seed)) for run in sweep.runs
          for seed in range(description["seeds"])]
  todo = [job for job in jobs if not finished(job[2], specs[job[0].name]["steps"])]
  steps = lambda some: sum(specs[run.name]["steps"] for run, _, _ in some)
  print(f"{sweep.name} at scale {sweep.scale}: {len(jobs)} runs, {len(jobs) - len(todo)} finished already; "
        f"TensorBoard: tensorboard --logdir {sweep_dir}", file=sys.stderr)
  from tqdm import tqdm
  bar = tqdm(total=steps(jobs), initial=steps(jobs) - steps(todo), unit="step", file=sys.stderr,
             dynamic_ncols=True)
  failed = []
  for run, seed, folder in todo:
    folder.mkdir(parents=True, exist_ok=True)
    bar.set_description(f"{run.name} seed {seed}")
    seen = 0
    with open(folder / "train.log", "a") as log:
      process = subprocess.Popen(command(sweep, run, seed, folder.resolve(), extra), stdout=log,
                                 stderr=subprocess.STDOUT, cwd=REPO)
      try:
        while process.poll() is None:
          time.sleep(1.0)
          now = last_step(folder)
          bar.update(now - seen)
          seen = now
      except KeyboardInterrupt:  # the run saves a checkpoint and stops; the next call resumes it
        process.send_signal(signal.SIGINT)
        process.wait()
        bar.close()
        raise
    spec = specs[run.name]
    bar.update(last_step(folder) - seen)
    if process.returncode or last_step(folder) < (spec["stop_at"] or spec["steps"]):
      failed.append(f"{run.name}/seed{seed}")
      tail = (folder / "train.log").read_text().strip().splitlines()[-3:]
      bar.write(f"{run.name} seed {seed} failed (exit {process.returncode}): " + " | ".join(tail))
  bar.close()
  return failed


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.split("\n\n")[0])
  parser.add_argument("sweep", help=" | ".join(SWEEPS))
  parser.add_argument("--scale", default="tiny", help=" | ".join(SCALES))
  parser.add_argument("--seeds", type=int, default=0, help="seeds per run (default: the scale's)")
  parser.add_argument("--workdir", default="", help="sweep folder (default runs/sweeps/<sweep>-<scale>)")
  parser.add_argument("--runs", default="", help="only these runs (comma-separated names)")
  parser.add_argument("--dry-run", action="store_true", help="print the runs, train nothing")
  args, rest = parser.parse_known_args(argv)
  try:
    sweep = build(args.sweep, args.scale)
    extra = parse_override_args(rest)
    if args.runs:
      names = args.runs.split(",")
      unknown = sorted(set(names) - {r.name for r in sweep.runs})
      if unknown:
        raise ConfigError(f"unknown run(s) {', '.join(unknown)} (runs: {', '.join(r.name for r in sweep.runs)})")
      sweep = Sweep(sweep.name, sweep.scale, tuple(r for r in sweep.runs if r.name in names))
    seeds = args.seeds or SCALES[args.scale].seeds
    if seeds < 1:
      raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    description = describe(sweep, extra, seeds)  # also checks every override against the config
  except (ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sweep_dir = Path(args.workdir or f"runs/sweeps/{args.sweep}-{args.scale}")
  print(table(description))
  if args.dry_run:
    return 0
  try:
    failed = execute(sweep, sweep_dir, description, extra)
  except KeyboardInterrupt:
    print("\nstopped; run the same command again to resume", file=sys.stderr)
    return 130
  if failed:
    print(f"{len(failed)} run(s) failed: {', '.join(failed)} (see their train.log); run again to retry",
          file=sys.stderr)
    return 1
  print(f"done; report: python -m experiments.report {sweep_dir}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
