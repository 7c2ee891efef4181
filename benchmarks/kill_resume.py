"""kill -9 at random moments, then the same command again: does the run resume exactly?

A small model trains with asynchronous checkpoints every 3 steps. Each trial starts the training command
in a fresh folder, kills it (SIGKILL) after a random delay drawn over the whole run (start-up, steps,
saves), runs the same command again to the end, and compares every logged training and held-out loss and
the final parameters with an uninterrupted run's, bitwise. Prints how many trials resumed exactly.

  python benchmarks/kill_resume.py [--kills 10] [--steps 48] [--seed 0]
"""

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def command(workdir: Path, corpus: str, steps: int) -> list[str]:
  overrides = {"data.source": "text", "data.path": corpus, "data.seq_len": 32, "train.batch_size": 8,
               "train.steps": steps, "train.warmup_steps": 4, "train.eval_every": 6, "train.eval_batches": 2,
               "log.every": 1, "log.progress": "false", "checkpoint.every": 3, "checkpoint.keep": 2,
               "checkpoint.async_save": "true", "log.peak_flops": 1e12, "model.n_layers": 1, "model.d_model": 32,
               "model.d_ff": 64}
  return ([sys.executable, "-m", "gptoss_jax.train", "--config", "configs/gpt2.py:tiny", "--workdir", str(workdir)]
          + [f"--config.{k}={v}" for k, v in overrides.items()])


def wait_for_first_step(workdir: Path) -> float:
  """The moment the run logged its first step (start-up, data and compilation done)."""
  while not (workdir / "metrics.jsonl").is_file() or not (workdir / "metrics.jsonl").read_text().strip():
    time.sleep(0.05)
  return time.perf_counter()


def logged(workdir: Path) -> dict:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {(r["step"], k): r[k] for r in rows for k in ("train/loss", "eval/loss") if k in r}


def final_params(workdir: Path):
  import jax
  from gptoss_jax.config import RunConfig
  from gptoss_jax.sharding import make_mesh
  from gptoss_jax.train.checkpoint import Checkpointer
  from gptoss_jax.train.step import Trainer
  saved = RunConfig.from_dict(json.loads((workdir / "config.json").read_text()))
  trainer = Trainer(saved.model, saved.train, make_mesh({"data": 1}, jax.devices()[:1]))
  state, _ = Checkpointer(workdir / "checkpoints").restore(trainer.abstract_state())
  return [jax.device_get(x) for x in jax.tree.leaves(state.params)]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kills", type=int, default=10)
  parser.add_argument("--steps", type=int, default=48)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rng = random.Random(args.seed)
  corpus = ",".join(str(p) for p in sorted(REPO.glob("gptoss_jax/**/*.py")))
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    proc = subprocess.Popen(command(tmp / "straight", corpus, args.steps), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = wait_for_first_step(tmp / "straight")
    proc.wait()
    duration = time.perf_counter() - first
    want_logs, want_params = logged(tmp / "straight"), final_params(tmp / "straight")
    print(f"uninterrupted run: {args.steps} steps in {duration:.1f} s after start-up; {args.kills} trials, each "
          f"killed once (SIGKILL) at a random moment of its training: [0, {duration:.1f}] s after its first step",
          flush=True)
    exact = 0
    for trial in range(args.kills):
      workdir = tmp / f"trial{trial}"
      delay = rng.uniform(0.0, duration)
      proc = subprocess.Popen(command(workdir, corpus, args.steps), cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
      wait_for_first_step(workdir)
      time.sleep(delay)
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      before = max((s for s, _ in logged(workdir)), default=0) if (workdir / "metrics.jsonl").exists() else 0
      again = subprocess.run(command(workdir, corpus, args.steps), cwd=REPO, capture_output=True, text=True)
      same = again.returncode == 0 and logged(workdir) == want_logs and all(
          (a == b).all() for a, b in zip(final_params(workdir), want_params))
      exact += same
      resumed = next((line for line in again.stderr.splitlines() if line.startswith("resumed from")), "started afresh")
      print(f"trial {trial}: killed {delay:5.1f} s after its first step (step {before} logged), "
            f"{resumed.split(' in ')[0]}: {'exact' if same else 'DIFFERENT'}", flush=True)
    print(f"{exact} of {args.kills} killed runs resumed exactly (every logged loss and the final parameters)")
  return 0 if exact == args.kills else 1


if __name__ == "__main__":
  sys.exit(main())
