"""Running a sweep's trainings: each one a `python -m gptoss_jax.train` process in a session of its own, on
its slot, with its output in train.log; progress over every training's steps; a stop (Ctrl-C, SIGTERM,
SIGHUP) forwarded to each training exactly once, so each saves its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from experiments.description import SweepDescription
from experiments.folders import EVALUATION_FILE, finished, last_step
from experiments.plan import WIDEN, Job, Scheduler
from experiments.slots import Slot, slots, visible_gpus
from experiments.sweeps import Run, Sweep
from experiments.sync import keep, keep_unkept, take_kept
from gptoss_jax.data.prepare import ensure_dataset


def command(sweep: Sweep, run: Run, seed: int, lr: float, folder: Path, extra: dict[str, str]) -> list[str]:
  """The training command for one training: its typed config written to FOLDER/run.json and passed as
  the config file (nothing goes through override strings)."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "run.json").write_text(json.dumps(sweep.config(run, seed, lr, extra).to_dict(), indent=1))
  return [sys.executable, "-m", "gptoss_jax.train", "--config", str(folder / "run.json"), "--workdir", str(folder)]


def evaluation_command(sweep: Sweep, folder: Path) -> list[str]:
  return [sys.executable, "-m", sweep.evaluation, str(folder)]


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


def _stop(processes: list[subprocess.Popen]) -> None:
  """One SIGTERM to each training: it saves a checkpoint at the end of its step and exits. SIGTERM, never
  SIGINT: a training that got a signal of its own as well (a scheduler signalling every process) takes a
  second SIGINT as a person's "stop now", without the checkpoint."""
  for process in processes:
    process.send_signal(signal.SIGTERM)
  for process in processes:
    process.wait()


def stop_on_signals() -> None:
  """SIGTERM, SIGHUP (what a rented machine sends) and Ctrl-C raise KeyboardInterrupt in the runner, which
  execute() answers by stopping every training once. SIGINT is set too: a process started in the background
  (a script's `&`, pytest-xdist's workers) inherits SIGINT ignored, and Python then keeps it so."""
  for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(sig, _interrupt)


def _interrupt(signum, frame):
  raise KeyboardInterrupt
