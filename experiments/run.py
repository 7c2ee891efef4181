"""python -m experiments.run <sweep> --scale tiny [--seeds N] [--lrs a,b,c] [--widen N] [--jobs N]
[--workdir DIR] [--results DIR] [--runs a,b] [--dry-run [--device D [--from-program]]] [--config.a.b=value ...]

Runs every run of a sweep through the training command. Each run first trains once per learning rate
of the grid on each of its selection seeds (DIR/<run>/lr<value>-seed<k>, seeds never compared); the value
with the lowest validation loss, averaged over the selection seeds, is kept (a best value at the edge of
the grid adds the next value beyond it, up to --widen times), and the compared seeds 0..N-1 train at it
(DIR/<run>/seed<k>), reporting their test loss: the choice never sees the test split. `--jobs N` trains N at a time,
the CPUs split between them. A second call skips finished trainings and resumes unfinished ones.
Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from experiments import cost, power
from experiments.description import SweepDescription
from experiments.folders import three_digits
from experiments.plan import WIDEN, describe, table
from experiments.slots import slots, tpu_host, visible_gpus
from experiments.supervise import execute, stop_on_signals
from experiments.sweeps import SCALES, SWEEPS, Sweep, broken_by, build
from gptoss_jax import runtime
from gptoss_jax.config import ConfigError
from gptoss_jax.config_files import parse_override_args

# --smoke: every run at its real widths, depths and vocabulary, for 2 steps of a short batch on 8 fake CPU devices,
# from a local corpus (Shakespeare, in the scale's tokenizer), through checkpoint, test split and report. The
# training state is sharded over the 8 devices (fsdp), not replicated: 8 replicas of the gpu scale's e64_k4 (1.1B
# parameters, 18 GB of float32 state and Adam moments each) would need ~140 GB of host memory. Each run is built
# for the scale's platform (Scale.platform: the GPU's MoE dispatch and attention kernel, with XLA's formulation
# of its kernels on the CPU). Overrides given on the command line win over these.
SMOKE = {"mesh.data": "1", "mesh.fsdp": "-1", "train.steps": "2", "train.batch_size": "8", "data.seq_len": "32",
         "train.warmup_steps": "1", "train.eval_every": "2", "train.eval_batches": "1", "checkpoint.every": "2",
         "log.every": "1", "data.source": "shakespeare", "data.path": "", "data.max_tokens": "0",
         "data.val_fraction": "0.03", "data.test_fraction": "0.03", "train.microbatches": "1"}
# 8 fake devices; on a loaded host (a 2-core machine running a sweep) one device's thread can reach a collective
# more than XLA:CPU's default 40 s after the others, which then abort the process: wait up to 10 minutes. And XLA:CPU's
# concurrency-optimized scheduler, which single-device CPU runs turn off (runtime.configure): on 8 fake devices it
# keeps each one's temporaries smaller (the gpu scale's e16_k2: 0.93 GiB a device, against 2.41 without it)
SMOKE_DEVICES = ("--xla_force_host_platform_device_count=8 --xla_cpu_collective_call_terminate_timeout_seconds=600 "
                 f"{runtime.SCHEDULER_FLAG}=true")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.split("\n\n")[0])
  parser.add_argument("sweep", help=" | ".join(SWEEPS))
  parser.add_argument("--scale", default="tiny", help=" | ".join(SCALES))
  parser.add_argument("--seeds", type=int, default=0, help="compared seeds per run (default: the fewest with which "
                      "every Holm family of the report can conclude, at least the scale's)")
  parser.add_argument("--lrs", default="", help="learning-rate grid, comma-separated (default: the scale's); "
                                                "one value: no tuning")
  parser.add_argument("--widen", type=int, default=WIDEN, help="values added beyond a grid edge that holds "
                                                                 "the best loss (0: only flag it in the report)")
  parser.add_argument("--jobs", type=int, default=1, help="trainings at a time, the CPUs (and GPUs) split between them")
  parser.add_argument("--devices-per-job", type=int, default=1, help="GPUs per training (CUDA_VISIBLE_DEVICES)")
  parser.add_argument("--workdir", default="", help="sweep folder (default runs/sweeps/<sweep>-<scale>)")
  parser.add_argument("--runs", default="", help="only these runs (comma-separated names)")
  parser.add_argument("--results", default="", help="keep each finished training's small files (config.json, "
                      "metrics.jsonl, heldout.json) here, to commit; a later call takes the finished ones back")
  parser.add_argument("--allow-changed-runs", action="store_true", help="run a sweep whose model overrides "
                      "change what its runs compare (refused otherwise; recorded in sweep.json)")
  parser.add_argument("--dry-run", action="store_true", help="print the runs, train nothing")
  parser.add_argument("--smoke", action="store_true", help="every run at its real shapes for 2 steps on 8 fake CPU "
                                                           "devices, from a local corpus (checks a sweep before paying)")
  parser.add_argument("--device", default="", help=f"print the cost on this accelerator ({' | '.join(cost.DEVICES)})")
  parser.add_argument("--seed-sd", type=float, default=0.0, help="paired seed sd of the final loss (nats) for the "
                      "detectable difference the dry-run prints (default: the tiny sweep's)")
  parser.add_argument("--mfu", type=float, default=cost.DEFAULT_MFU, help="the share of peak FLOP/s assumed for --device")
  parser.add_argument("--from-program", action="store_true", help="--device's FLOPs and memory from each run's "
                      "training step as the scale's platform builds it (traced and compiled here: minutes)")
  return parser


def _plan(args: argparse.Namespace, rest: list[str]) -> tuple[Sweep, dict[str, str], SweepDescription]:
  """The command line checked: the sweep (its --runs), the overrides and the sweep's description."""
  sweep = build(args.sweep, args.scale)
  smoke = SMOKE | {"model.platform": SCALES[args.scale].platform}  # the accelerator's program, run on the CPU
  extra = (smoke if args.smoke else {}) | parse_override_args(rest)
  if "train.lr" in extra or "train.seed" in extra:
    raise ConfigError("train.lr and train.seed are set per training by the runner (use --lrs and --seeds)")
  broken = broken_by(sweep, extra)
  if broken and not args.allow_changed_runs:
    raise ConfigError(f"the overrides change what runs of the {sweep.name} sweep compare: {'; '.join(broken)} "
                      "(--allow-changed-runs runs them so, and records it in sweep.json)")
  if args.runs:
    names = args.runs.split(",")
    unknown = sorted(set(names) - {r.name for r in sweep.runs})
    if unknown:
      raise ConfigError(f"unknown run(s) {', '.join(unknown)} (runs: {', '.join(r.name for r in sweep.runs)})")
    sweep = dataclasses.replace(sweep, runs=tuple(r for r in sweep.runs if r.name in names))
  if args.smoke:  # one learning rate (no tuning) and one seed
    args.lrs, args.widen = args.lrs or str(SCALES[args.scale].lrs[len(SCALES[args.scale].lrs) // 2]), 0
  seeds = 1 if args.smoke else args.seeds or sweep.seeds
  if seeds < 2 and not args.smoke:
    raise ConfigError(f"--seeds must be >= 2 (paired statistics need two), got {seeds}")
  lrs = parse_lrs(args.lrs) if args.lrs else SCALES[args.scale].lrs
  if args.widen < 0:
    raise ConfigError(f"--widen must be >= 0, got {args.widen}")
  if args.jobs < 1 or args.devices_per_job < 1:
    raise ConfigError(f"--jobs and --devices-per-job must be >= 1, got {args.jobs} and {args.devices_per_job}")
  slots(args.jobs, args.devices_per_job, visible_gpus())
  if args.jobs > 1 and not args.smoke and tpu_host() and "TPU_VISIBLE_CHIPS" not in os.environ:
    raise ConfigError(f"--jobs {args.jobs} on a TPU host: every training would take all of its chips; run one at "
                      "a time (--jobs 1), or split the chips yourself (TPU_VISIBLE_CHIPS, one runner per split)")
  if args.seed_sd < 0:
    raise ConfigError(f"--seed-sd must be >= 0, got {args.seed_sd}")
  if not 0 < args.mfu <= 1:
    raise ConfigError(f"--mfu must be in (0, 1], got {args.mfu}")
  description = describe(sweep, extra, seeds, lrs)  # describing also checks every override
  return sweep, extra, dataclasses.replace(description, changed_runs=tuple(broken))


def main(argv: list[str] | None = None) -> int:
  args, rest = _parser().parse_known_args(argv)
  try:
    sweep, extra, description = _plan(args, rest)
    if args.from_program and not args.device:
      raise ConfigError("--from-program needs --device (it fills the cost table)")
    costs = (cost.table(sweep, description, extra, args.device, args.mfu, args.devices_per_job,
                        SCALES[args.scale].platform if args.from_program else "") if args.device else "")
  except (ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sweep_dir = Path(args.workdir or f"runs/sweeps/{args.sweep}-{args.scale}" + ("-smoke" if args.smoke else ""))
  print(table(description))
  if costs:
    print(costs)
  print(cost.disk_line(sweep, description, extra, args.jobs))
  short = [r.name for r in description.runs if r.tokens < description.min_tokens_per_active_param * r.active_params]
  if short:
    print(f"note: {', '.join(short)} train on fewer than the scale's {description.min_tokens_per_active_param:g} "
          "tokens per active parameter", file=sys.stderr)
  if not args.smoke:
    power.note(sweep.name, sweep.runs, sweep.evaluation, description.seeds, args.seed_sd)
  if args.dry_run:
    return 0
  stop_on_signals()
  try:
    failed = execute(sweep, sweep_dir, description, extra, args.jobs, args.widen,
                     Path(args.results) if args.results else None, args.devices_per_job,
                     {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {SMOKE_DEVICES}".strip(), "JAX_PLATFORMS": "cpu"}
                     if args.smoke else {})
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("\nstopped; run the same command again to resume", file=sys.stderr)
    return 130
  if failed:
    print(f"{len(failed)} training(s) failed: {', '.join(failed)} (see their train.log); run again to retry",
          file=sys.stderr)
    return 1
  if args.smoke:  # the report reads what the trainings wrote (without baselines: nothing to compare with here)
    from experiments import report
    return report.main([str(sweep_dir), "--no-baselines"])
  print(f"done; report: python -m experiments.report {sweep_dir}", file=sys.stderr)
  return 0


def parse_lrs(text: str) -> tuple[float, ...]:
  try:
    lrs = tuple(sorted({three_digits(float(v)) for v in text.split(",")}))
  except ValueError:
    raise ConfigError(f"--lrs must be comma-separated numbers, got {text!r}") from None
  if any(lr <= 0 for lr in lrs):
    raise ConfigError(f"--lrs must be > 0, got {text!r}")
  return lrs


if __name__ == "__main__":
  sys.exit(main())
