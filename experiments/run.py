"""python -m experiments.run <sweep> --scale tiny [--seeds N] [--lrs a,b,c] [--widen N] [--jobs N]
[--workdir DIR] [--results DIR] [--runs a,b] [--dry-run] [--config.a.b=value ...]

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
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from experiments import cost, power
from experiments.description import RunSpec, SweepDescription
from experiments.folders import (EVALUATION_FILE, SMALL_FILES, Choice, choose_lr, finished, grid_trainings,  # noqa: F401
                                 last_step, lr_dir, metrics, run_dir, selection_losses, three_digits)
from experiments.paired import ALPHA, seeds_needed, sign_flip_floor
from experiments.sweeps import SCALES, SWEEPS, Run, Sweep, broken_by, build
from gptoss_jax import runtime
from gptoss_jax.config import ConfigError
from gptoss_jax.config_files import parse_override_args
from gptoss_jax.inspect import stats
from gptoss_jax.data.prepare import ensure_dataset

WIDEN = 2  # default: grid values added beyond an edge before the run goes on (and the report flags it)
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


def command(sweep: Sweep, run: Run, seed: int, lr: float, folder: Path, extra: dict[str, str]) -> list[str]:
  """The training command for one training: its typed config written to FOLDER/run.json and passed as
  the config file (nothing goes through override strings)."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "run.json").write_text(json.dumps(sweep.config(run, seed, lr, extra).to_dict(), indent=1))
  return [sys.executable, "-m", "gptoss_jax.train", "--config", str(folder / "run.json"), "--workdir", str(folder)]


def evaluation_command(sweep: Sweep, folder: Path) -> list[str]:
  return [sys.executable, "-m", sweep.evaluation, str(folder)]


def describe(sweep: Sweep, extra: dict[str, str], seeds: int, lrs: tuple[float, ...]) -> SweepDescription:
  """sweep.json: what the report needs besides the metrics. Resolving every run's config here also
  checks the command-line overrides before anything trains."""
  runs = []
  for run in sweep.runs:
    config = sweep.config(run, 0, lrs[0], extra)
    cfg = config.model
    s = stats(cfg, config.data.seq_len)
    tokens = config.train.batch_size * config.data.seq_len * config.train.steps
    runs.append(RunSpec(run.name, tuple(run.changes), run.baseline, run.note, s.total_params, s.active_params,
                        s.train_flops_per_token, cfg.n_experts, cfg.top_k, config.train.steps, config.train.stop_at,
                        tokens, config.train.batch_size * config.data.seq_len))
  scale = SCALES[sweep.scale]
  return SweepDescription(sweep.name, sweep.scale, tuple(runs), seeds, tuple(lrs), tuple(scale.selection_seeds),
                          dict(extra), scale.min_tokens_per_active_param)


def table(description: SweepDescription) -> str:
  lines = [f"{'run':<18} {'changes':<44} {'params':>10} {'active':>10} {'train FLOPs/token':>18} "
           f"{'tokens/active':>14}"]
  for r in description.runs:
    lines.append(f"{r.name:<18} {','.join(r.changes) or '-':<44.44} {r.total_params:>10,} "
                 f"{r.active_params:>10,} {r.flops_per_token:>18,.0f} {r.tokens / r.active_params:>14.1f}")
  return "\n".join(lines)


def trainings_per_run(description: SweepDescription) -> int:
  """Trainings each run needs at least (a grid widened at an edge adds selection trainings)."""
  return len(description.lrs) * len(description.selection_seeds) * description.tuned + description.seeds


def cost_table(sweep: Sweep, description: SweepDescription, extra: dict[str, str], device: str, mfu: float,
               devices_per_job: int = 1) -> str:
  """Per run and for the whole sweep: training FLOPs, hours on `device` at `mfu`, and each training's peak
  memory per device (an estimate), flagged with what to change where it would not fit."""
  dev, n = cost.device(device), trainings_per_run(description)
  lines = [f"cost on {device} ({dev.peak_flops / 1e12:.0f} TFLOP/s bf16 peak, {dev.memory_gib:g} GiB) at an assumed MFU "
           f"of {mfu:g}, {devices_per_job} device(s) per training, {n} trainings per run:",
           f"{'run':<18} {'FLOPs/training':>15} {'h/training':>11} {'h/run':>9} {'memory GiB':>11}  fits?"]
  total = 0.0
  for run, spec in zip(sweep.runs, description.runs):
    e = cost.estimate(sweep.config(run, 0, description.lrs[0], extra), spec.flops_per_token, dev, mfu,
                      devices_per_job)
    total += e["device_hours"] * n
    lines.append(f"{run.name:<18} {e['train_flops']:>15.3g} {e['device_hours'] / devices_per_job:>11.2f} "
                 f"{e['device_hours'] * n / devices_per_job:>9.1f} {e['memory_gib']:>11.1f}  "
                 + ("yes" if not e["advice"] else f"NO: {e['advice']}"))
  lines.append(f"whole sweep: {total:,.1f} {device}-hours ({total / 24:,.1f} days on one; widened grids add to it)")
  return "\n".join(lines)


STATE_BYTES_PER_PARAM = 12  # what a checkpoint holds per parameter: float32 weights and Adam's two moments


def disk_line(sweep: Sweep, description: SweepDescription, extra: dict[str, str]) -> str:
  """The disk the sweep's checkpoints take once every training has finished (each keeps its newest
  checkpoint.keep, optimizer state included)."""
  n, total = trainings_per_run(description), 0
  for run, spec in zip(sweep.runs, description.runs):
    total += n * sweep.config(run, 0, description.lrs[0], extra).checkpoint.keep * spec.total_params
  total *= STATE_BYTES_PER_PARAM
  return (f"disk: {total / 1e9:,.1f} GB of checkpoints when every training has finished ({n} trainings a run, each "
          f"keeping checkpoint.keep of {STATE_BYTES_PER_PARAM} bytes a parameter: float32 weights and Adam moments)")


@dataclasses.dataclass(frozen=True)
class Job:
  run: Run
  seed: int
  lr: float
  folder: Path
  evaluate: bool = False  # the sweep's evaluation of a finished compared training, not a training


class Scheduler:
  """Which trainings can start now: a run's learning-rate grid first, then (once its grid is done and
  its best value is inside the grid) its compared seeds at the chosen value."""

  def __init__(self, sweep: Sweep, sweep_dir: Path, description: SweepDescription, widen: int = WIDEN):
    self.sweep, self.dir, self.d, self.widen = sweep, sweep_dir, description, widen
    self.specs = {r.name: r for r in description.runs}
    self.failed: set[str] = set()  # runs with a failed training: nothing more of them is started

  def steps(self, run: Run) -> int:
    return self.specs[run.name].steps

  def target(self, run: Run) -> int:
    """Where this call's trainings stop: train.stop_at if set, else the last step."""
    return self.specs[run.name].stop_at or self.steps(run)

  def tuned(self) -> bool:
    return self.d.tuned

  def choice(self, run: Run) -> Choice | None:
    """The run's learning rate once every value tried has finished on every selection seed (None before)."""
    if not self.tuned():
      return Choice(self.d.lrs[0], {}, None, False)
    seeds = self.d.selection_seeds
    losses = selection_losses(self.dir / run.name, self.steps(run), seeds)
    tried = set(self.d.lrs) | {lr for lr, _ in grid_trainings(self.dir / run.name, seeds[0])}
    if any(len(losses.get(lr, {})) < len(seeds) for lr in tried):
      return None
    return choose_lr({lr: sum(losses[lr][s] for s in seeds) / len(seeds) for lr in tried})

  def jobs(self) -> list[Job]:
    """Every training that is known now to be needed, finished or not."""
    out = []
    seeds = self.d.selection_seeds
    for run in self.sweep.runs:
      if self.tuned():
        tried = sorted(set(self.d.lrs) | {lr for lr, _ in grid_trainings(self.dir / run.name, seeds[0])})
        out += [Job(run, seed, lr, lr_dir(self.dir, run.name, lr, seed)) for lr in tried for seed in seeds]
      choice = self.choice(run)
      if choice is None:
        continue
      widened = len(choice.losses) - len(self.d.lrs)
      if choice.widen is not None and widened < self.widen:
        out += [Job(run, seed, choice.widen, lr_dir(self.dir, run.name, choice.widen, seed)) for seed in seeds]
      else:
        out += [Job(run, seed, choice.lr, run_dir(self.dir, run.name, seed)) for seed in range(self.d.seeds)]
    return out

  def ready(self, running: set[Path]) -> list[Job]:
    """Unfinished trainings, and the sweep's evaluation of each compared training finished without it."""
    out = []
    for j in self.jobs():
      if j.run.name in self.failed or j.folder in running:
        continue
      if not finished(j.folder, self.target(j.run)):
        out.append(j)
      elif (self.sweep.evaluation and j.folder == run_dir(self.dir, j.run.name, j.seed)
            and self.target(j.run) == self.steps(j.run) and not (j.folder / EVALUATION_FILE).is_file()):
        out.append(dataclasses.replace(j, evaluate=True))
    return out

  def total_steps(self) -> int:
    """Steps of every training the sweep will need as far as known (a widened grid adds to it)."""
    per_run = trainings_per_run(self.d)
    return sum(spec.steps * per_run for spec in self.specs.values())


def cpu_sets(jobs: int) -> list[set[int]]:
  """This process's CPUs split into `jobs` disjoint sets (each training runs on its own cores)."""
  cpus = sorted(os.sched_getaffinity(0))
  if jobs > len(cpus):
    raise ConfigError(f"--jobs {jobs} is more than the {len(cpus)} CPUs this process may use")
  return [set(cpus[i::jobs]) for i in range(jobs)]


def visible_gpus() -> list[str]:
  """The GPUs this host shows (CUDA_VISIBLE_DEVICES if set, else nvidia-smi's list), without starting JAX
  (which would take most of every GPU's memory in this process)."""
  if "CUDA_VISIBLE_DEVICES" in os.environ:
    return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
  if shutil.which("nvidia-smi") is None:
    return []
  out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True)
  return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one training runs: its CPUs and the environment that gives it its own accelerator(s)."""
  cpus: frozenset[int]
  env: dict[str, str]


def tpu_host() -> bool:
  """Whether this host has TPU chips (their device files) or the TPU runtime installed."""
  return any(Path("/dev").glob("accel*")) or importlib.util.find_spec("libtpu") is not None


def slots(jobs: int, devices_per_job: int, gpus: list[str]) -> list[Slot]:
  """One slot per concurrent training. With GPUs: slot i gets the i-th group of `devices_per_job` of them
  (CUDA_VISIBLE_DEVICES, set before the training starts JAX); more jobs than groups share the groups round
  robin, and then each sharing training takes only its share of the memory (JAX would preallocate 75% of a
  GPU in every process). Without GPUs (CPU; TPU hosts run one training per host): the CPUs split as before."""
  cpus = cpu_sets(jobs)
  if not gpus:
    return [Slot(frozenset(c), {}) for c in cpus]
  groups = [gpus[i:i + devices_per_job] for i in range(0, len(gpus) - devices_per_job + 1, devices_per_job)]
  if not groups:
    raise ConfigError(f"--devices-per-job {devices_per_job} is more than the {len(gpus)} GPUs this host shows")
  sharing = -(-jobs // len(groups))
  out = []
  for i, c in enumerate(cpus):
    env = {"CUDA_VISIBLE_DEVICES": ",".join(groups[i % len(groups)])}
    if sharing > 1:
      env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / sharing:.3f}"
    out.append(Slot(frozenset(c), env))
  return out


def keep(folder: Path, sweep_dir: Path, results: Path) -> None:
  """Copies a finished training's small files (and sweep.json) into the results folder, at the same place."""
  dst = results / folder.relative_to(sweep_dir)
  dst.mkdir(parents=True, exist_ok=True)
  for name in SMALL_FILES:
    if (folder / name).is_file():
      shutil.copy2(folder / name, dst / name)
  shutil.copy2(sweep_dir / "sweep.json", results / "sweep.json")


def take_kept(results: Path, sweep_dir: Path, description: SweepDescription) -> int:
  """Copies the finished trainings kept in `results` (by an earlier call, maybe on another machine) into the
  sweep folder, where the scheduler then skips them; returns how many. A results folder of another sweep
  description (other runs, grid, overrides or selection seeds) is refused."""
  if not (results / "sweep.json").is_file():
    return 0
  kept, now = (_what_trains(d).to_dict() for d in (SweepDescription.load(results / "sweep.json"), description))
  differ = sorted(k for k in set(kept) | set(now) if kept.get(k) != now.get(k))
  if differ:
    raise ConfigError(f"--results {results} holds another sweep (it differs in {', '.join(differ)}); give another folder")
  taken = _finished_only_in(results, sweep_dir, description)
  for sub, folder in taken:
    folder.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:
      if (sub / name).is_file():
        shutil.copy2(sub / name, folder / name)
  return len(taken)


def _what_trains(description: SweepDescription) -> SweepDescription:
  """A description without what does not change its trainings: the number of compared seeds (more may be
  added) and the FLOPs estimate (its method may improve)."""
  runs = tuple(dataclasses.replace(r, flops_per_token=0.0) for r in description.runs)
  return dataclasses.replace(description, seeds=0, runs=runs)


def _finished_only_in(src: Path, dst: Path, description: SweepDescription) -> list[tuple[Path, Path]]:
  """(training in src, the same place in dst) for each training of the sweep finished in src and not in dst."""
  pairs = []
  for folder in sorted(p.parent for p in src.glob("*/*/metrics.jsonl")):
    spec = description.run(folder.parent.name)
    other = dst / folder.relative_to(src)
    if spec and finished(folder, spec.steps) and not finished(other, spec.steps):
      pairs.append((folder, other))
  return pairs


def keep_unkept(sweep_dir: Path, results: Path, description: SweepDescription) -> int:
  """Keeps the sweep folder's finished trainings that `results` lacks (one that ended while the runner was
  being stopped was never kept); returns how many."""
  unkept = _finished_only_in(sweep_dir, results, description)
  for folder, _ in unkept:
    keep(folder, sweep_dir, results)
  return len(unkept)


def launch(cmd: list[str], folder: Path, env: dict[str, str], cpus: frozenset[int]) -> subprocess.Popen:
  """One training in the background, its output appended to FOLDER/train.log, pinned to its CPUs, in a
  session of its own: a Ctrl-C in the terminal, or a signal to the runner's process group, reaches the runner
  alone, which then asks each training to stop exactly once (_stop)."""
  with open(folder / "train.log", "a") as log:
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, cpus))


def execute(sweep: Sweep, sweep_dir: Path, description: SweepDescription, extra: dict[str, str], jobs: int = 1,
            widen: int = WIDEN, results: Path | None = None, devices_per_job: int = 1,
            env_extra: dict[str, str] | None = None) -> list[str]:
  """Trains every unfinished job, `jobs` at a time; returns the names of the ones that failed. With
  `results`, finished trainings kept there are taken first, and each training that finishes is kept."""
  sweep_dir.mkdir(parents=True, exist_ok=True)
  description.save(sweep_dir / "sweep.json")
  if results is not None:
    print(f"{take_kept(results, sweep_dir, description)} finished training(s) taken from {results}, "
          f"{keep_unkept(sweep_dir, results, description)} kept there", file=sys.stderr)
  # once, before trainings that would race to prepare it
  ensure_dataset(sweep.config(sweep.runs[0], 0, description.lrs[0], extra).data, progress=True)
  plan = Scheduler(sweep, sweep_dir, description, widen)
  places = slots(jobs, devices_per_job, visible_gpus())
  # one compilation per program: the seeds of a run share their train step (JAX's persistent cache)
  env = os.environ | {"JAX_COMPILATION_CACHE_DIR": str((sweep_dir / ".jax_cache").absolute()),
                      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"} | (env_extra or {})
  done_before = sum(last_step(j.folder) for j in plan.jobs())
  tuning = (f"{len(description.lrs)} learning rates x {len(description.selection_seeds)} selection seeds + "
            if description.tuned else "")
  print(f"{sweep.name} at scale {sweep.scale}: {len(sweep.runs)} runs x ({tuning}{description.seeds} seeds), "
        f"{jobs} at a time; TensorBoard: tensorboard --logdir {sweep_dir}", file=sys.stderr)
  from tqdm import tqdm
  bar = tqdm(total=plan.total_steps(), initial=done_before, unit="step", file=sys.stderr, dynamic_ncols=True,
             mininterval=2.0 if sys.stderr.isatty() else 60.0)
  running: dict[Path, tuple[Job, subprocess.Popen, int, Slot]] = {}  # folder -> job, process, steps seen, slot
  failed = []
  try:
    while True:
      free = [s for s in places if all(s is not slot for *_, slot in running.values())]
      for job, slot in zip(plan.ready(set(running)), free):
        cmd = (evaluation_command(sweep, job.folder.resolve()) if job.evaluate
               else command(sweep, job.run, job.seed, job.lr, job.folder.resolve(), extra))
        running[job.folder] = (job, launch(cmd, job.folder, env | slot.env, slot.cpus), last_step(job.folder), slot)
      if not running:
        break
      time.sleep(1.0)
      for folder, (job, process, seen, slot) in list(running.items()):
        now = last_step(folder)
        bar.update(now - seen)
        running[folder] = (job, process, now, slot)
        if process.poll() is None:
          continue
        del running[folder]
        failed += _ended(job, process.returncode, plan, sweep_dir, results, bar)
      bar.total = max(bar.total, bar.n)
  except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP: every running training saves a checkpoint and stops
    _stop([process for _, process, _, _ in running.values()])
    bar.close()
    raise
  bar.close()
  return failed


def _ended(job: Job, returncode: int, plan: Scheduler, sweep_dir: Path, results: Path | None, bar) -> list[str]:
  """A job's process has ended: keeps the training's files, and returns [its name] if it failed."""
  name = f"{job.run.name}/{job.folder.name}" + (" evaluation" if job.evaluate else "")
  bar.set_description(f"{name} done")
  if results is not None and finished(job.folder, plan.steps(job.run)):
    keep(job.folder, sweep_dir, results)
  done = (job.folder / EVALUATION_FILE).is_file() if job.evaluate else finished(job.folder, plan.target(job.run))
  if not returncode and done:
    return []
  plan.failed.add(job.run.name)
  tail = (job.folder / "train.log").read_text().strip().splitlines()[-3:]
  bar.write(f"{name} failed (exit {returncode}): " + " | ".join(tail))
  return [name]


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


def _power_note(sweep: Sweep, seeds: int, seed_sd: float) -> None:
  """The report's Holm families at these seeds (stdout), and a note (stderr) for each that cannot conclude."""
  families = power.families(sweep.runs, sweep.evaluation)
  source = "--seed-sd" if seed_sd else f"the tiny {sweep.name} sweep's median" if sweep.name in power.SEED_SD else "none"
  print(power.table(sweep.runs, sweep.evaluation, seeds, seed_sd or power.SEED_SD.get(sweep.name, math.nan), source))
  for name, m in families.items():
    if sign_flip_floor(seeds, m) > ALPHA:
      print(f"note: with {seeds} seeds the sign-flip test cannot pass Holm over the {m} tests of '{name}' (smallest "
            f"adjusted p {sign_flip_floor(seeds, m):.3f}): nothing there can be called distinguishable; "
            f"--seeds {seeds_needed(m)} can", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
  args, rest = _parser().parse_known_args(argv)
  try:
    sweep, extra, description = _plan(args, rest)
    costs = cost_table(sweep, description, extra, args.device, args.mfu, args.devices_per_job) if args.device else ""
  except (ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sweep_dir = Path(args.workdir or f"runs/sweeps/{args.sweep}-{args.scale}" + ("-smoke" if args.smoke else ""))
  print(table(description))
  if costs:
    print(costs)
  print(disk_line(sweep, description, extra))
  short = [r.name for r in description.runs if r.tokens < description.min_tokens_per_active_param * r.active_params]
  if short:
    print(f"note: {', '.join(short)} train on fewer than the scale's {description.min_tokens_per_active_param:g} "
          "tokens per active parameter", file=sys.stderr)
  if not args.smoke:
    _power_note(sweep, description.seeds, args.seed_sd)
  if args.dry_run:
    return 0
  # what a rented machine sends, and Ctrl-C: SIGINT set too, since a process started in the background (a
  # script's `&`, pytest-xdist's workers) inherits SIGINT ignored and Python then keeps it so
  for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(sig, _interrupt)
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


def _stop(processes: list[subprocess.Popen]) -> None:
  """One SIGTERM to each training: it saves a checkpoint at the end of its step and exits. SIGTERM, never
  SIGINT: a training that got a signal of its own as well (a scheduler signalling every process) takes a
  second SIGINT as a person's "stop now", without the checkpoint."""
  for process in processes:
    process.send_signal(signal.SIGTERM)
  for process in processes:
    process.wait()


def _interrupt(signum, frame):
  raise KeyboardInterrupt


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
