"""Whole-sweep throughput: the same runs of a tiny sweep (learning-rate grid + seeds) through
`python -m experiments.run` one after another (--jobs 1) and N at a time with the CPUs split between
them (--jobs N), each in a fresh sweep folder; wall time from start to finish, training tokens per second,
and the CPU cores kept busy on average (CPU time of the sweep's processes / wall time): the ceiling of the
speed-up is the ratio of the two sweeps' busy cores.

  python benchmarks/sweep_throughput.py [--sweep ladder] [--runs no_dropout,moe] [--seeds 2]
      [--lrs 1e-3,3e-3] [--steps 350] [--jobs 2]
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from experiments.description import SweepDescription  # noqa: E402


def children_cpu_s() -> float:
  """CPU seconds (user + system) of every finished child process and its descendants so far."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def sweep_once(args, jobs: int, folder: Path) -> tuple[float, float, int]:
  """(wall seconds, CPU seconds of its processes, training tokens) of one whole sweep."""
  command = [sys.executable, "-m", "experiments.run", args.sweep, "--scale", "tiny", "--runs", args.runs,
             "--seeds", str(args.seeds), "--lrs", args.lrs, "--widen", "0", "--jobs", str(jobs),
             "--workdir", str(folder), f"--config.train.steps={args.steps}"]
  start, cpu_start = time.perf_counter(), children_cpu_s()
  subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wall, cpu_s = time.perf_counter() - start, children_cpu_s() - cpu_start
  description = SweepDescription.load(folder / "sweep.json")
  trainings = len(description.runs) * description.trainings_per_run
  return wall, cpu_s, trainings * args.steps * description.runs[0].tokens_per_step


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sweep", default="ladder")
  parser.add_argument("--runs", default="no_dropout,moe", help="a dense and a MoE run by default")
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--lrs", default="1e-3,3e-3")
  parser.add_argument("--steps", type=int, default=350)
  parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
  args = parser.parse_args()
  print(f"{args.sweep}: runs {args.runs}, {len(args.lrs.split(','))} learning rates + {args.seeds} seeds each, "
        f"{args.steps} steps per training, {len(os.sched_getaffinity(0))} CPUs")
  walls = {}
  for jobs in (1, args.jobs):
    with tempfile.TemporaryDirectory() as tmp:
      wall, cpu_s, tokens = sweep_once(args, jobs, Path(tmp) / "sweep")
    walls[jobs] = wall
    print(f"--jobs {jobs}: {wall:7.1f} s wall, {tokens / wall:9,.0f} training tokens/s, "
          f"{cpu_s / wall:.2f} cores busy on average")
  print(f"whole-sweep speed-up of --jobs {args.jobs} over one after another: {walls[1] / walls[args.jobs]:.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
