"""Runs that survive faults, each through the training command end to end: damaged checkpoints,
resumes with a changed config, non-finite losses, kill -9, SIGINT / SIGTERM and a second live run."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO
from gptoss_jax.config import RunConfig
from gptoss_jax.data.pipeline import eval_batches
from gptoss_jax.sharding import make_mesh
from gptoss_jax.train.checkpoint import Checkpointer
from gptoss_jax.train.step import Trainer

CONFIG = "configs/gpt2.py:tiny"


def args_for(dataset, **extra) -> list[str]:
  """A one-layer model that trains in well under a second per step."""
  base = {"data.dir": dataset, "data.seq_len": 32, "train.batch_size": 8, "train.steps": 4, "train.warmup_steps": 2,
          "train.eval_every": 2, "train.eval_batches": 2, "log.every": 1, "log.progress": "false",
          "checkpoint.every": 2, "checkpoint.async_save": "false", "log.peak_flops": 1e12, "model.n_layers": 1,
          "model.d_model": 32, "model.d_ff": 64, "checkpoint.keep_optimizer": "true"}  # faults: resumable states
  return [f"--config.{k}={v}" for k, v in (base | extra).items()]


def cli(workdir, args, **popen) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "gptoss_jax.train", "--config", CONFIG, "--workdir", str(workdir),
                           *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def run_cli(workdir, args, timeout=300) -> tuple[int, str]:
  proc = cli(workdir, args)
  _, err = proc.communicate(timeout=timeout)
  return proc.returncode, err


def logged(workdir, key="train/loss") -> dict[int, float]:
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  out = {}
  for row in rows:
    if key in row:
      assert row["step"] not in out, f"step {row['step']} logged twice"
      out[row["step"]] = row[key]
  return out


def restore(workdir, step=None):
  """(trainer, state) of a run's newest checkpoint, or of `step`."""
  saved = RunConfig.from_dict(json.loads((workdir / "config.json").read_text()))
  trainer = Trainer(saved.model, saved.train, make_mesh({"data": 1}, jax.devices()[:1]))
  state, _ = Checkpointer(workdir / "checkpoints").restore(trainer.abstract_state(), step)
  return trainer, state


def held_out_loss(workdir, dataset, step) -> float:
  trainer, state = restore(workdir, step)
  batches = eval_batches(dataset, 32, 8, 2)
  return float(np.mean([trainer.eval_step(state.params, state.rest, trainer.global_batch(b)) for b in batches]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_dataset):
  """A finished 4-step run (checkpoints at 2 and 4), and a straight 6-step run to compare resumes with."""
  root = tmp_path_factory.mktemp("runs")
  for name, steps in (("four", 4), ("six", 6)):
    code, err = run_cli(root / name, args_for(text_dataset, **{"train.steps": steps, "train.warmup_steps": 2}))
    assert code == 0, err
  return root


def snapshot(folder) -> dict:
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize("damage", ["metadata", "array"])
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_finishes(runs, text_dataset, tmp_path, damage):
  workdir = tmp_path / "run"
  shutil.copytree(runs / "four", workdir)
  state = workdir / "checkpoints" / "4" / "state"
  victims = [state / "_METADATA"] if damage == "metadata" else \
      [p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"]  # the array data files
  for victim in victims:
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])  # truncated
  code, err = run_cli(workdir, args_for(text_dataset, **{"train.steps": 6}))
  assert code == 0, err
  assert "checkpoint 4 is damaged" in err and "moved to 4.damaged" in err and "resumed from step 2" in err
  assert (workdir / "checkpoints" / "4.damaged").is_dir()
  assert Checkpointer(workdir / "checkpoints").steps() == [2, 4, 6]
  assert logged(workdir) == logged(runs / "six")  # steps 3 and 4 trained again, exactly


def test_resume_with_a_changed_config_is_refused_and_touches_nothing(runs, text_dataset, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(runs / "four", workdir)
  before = snapshot(workdir)
  for change, field in (({"model.d_ff": 128}, "model.d_ff 64 -> 128"), ({"data.seq_len": 16}, "data.seq_len"),
                        ({"train.seed": 3}, "train.seed"), ({"train.lr": 1e-4}, "train.lr")):
    code, err = run_cli(workdir, args_for(text_dataset, **{"train.steps": 6}, **change))
    assert code == 2 and field in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(workdir) == before
  # how long and how often may change
  code, err = run_cli(workdir, args_for(text_dataset, **{"train.steps": 6, "log.every": 2, "checkpoint.every": 3,
                                                         "train.eval_every": 3}))
  assert code == 0 and "resumed from step 4" in err, err


def test_non_finite_loss_stops_and_names_a_checkpoint_with_a_finite_held_out_loss(text_dataset, tmp_path):
  """Warmup from 0: step 1 changes nothing, then a learning rate of 1e38 makes the parameters infinite
  (while the loss computed before that update is still finite)."""
  workdir = tmp_path / "run"
  code, err = run_cli(workdir, args_for(text_dataset, **{"train.lr": 1e38, "train.warmup_steps": 4,
                                                         "train.clip_norm": 0.0, "train.steps": 8,
                                                         "checkpoint.every": 1}))
  assert code == 1, err
  named = int(err.split("last good checkpoint: step ")[1].split()[0])
  steps = Checkpointer(workdir / "checkpoints").steps()
  assert steps and max(steps) == named
  for step in steps:  # nothing non-finite was ever saved
    _, state = restore(workdir, step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    assert np.isfinite(held_out_loss(workdir, text_dataset, step))


def test_kill_9_during_steps_and_saves_resumes_exactly(text_dataset, tmp_path):
  """kill -9 at a random moment after step 4 and a finished save (asynchronous saves every 2 steps), before the
  last step (checked), then the same command: it resumes, and every logged loss and the final parameters equal an uninterrupted
  run's, bitwise."""
  steps = 24
  args = args_for(text_dataset, **{"train.steps": steps, "checkpoint.async_save": "true", "train.eval_every": 4})
  code, err = run_cli(tmp_path / "straight", args)
  assert code == 0, err
  proc = cli(tmp_path / "killed", args)
  deadline = time.time() + 120
  # a finished save: orbax renames a step's temporary folder to the bare step number when it is complete
  saved = lambda: any(p.name.isdigit() for p in (tmp_path / "killed" / "checkpoints").glob("*"))
  while time.time() < deadline and (max(logged_steps(tmp_path / "killed"), default=0) < 4 or not saved()):
    time.sleep(0.02)
  time.sleep(random.Random(os.getpid()).uniform(0.0, 0.2))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL  # it was still running
  assert 4 <= max(logged_steps(tmp_path / "killed")) < steps  # killed between step 4 and the last
  code, err = run_cli(tmp_path / "killed", args)
  assert code == 0 and "resumed from step" in err, err
  for key in ("train/loss", "eval/loss"):
    assert logged(tmp_path / "killed", key) == logged(tmp_path / "straight", key)
  _, a = restore(tmp_path / "straight")
  _, b = restore(tmp_path / "killed")
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)


def logged_steps(workdir) -> list[int]:
  path = workdir / "metrics.jsonl"
  lines = path.read_text().splitlines() if path.exists() else []
  return [json.loads(line)["step"] for line in lines if line.endswith("}")]  # a line being written is left out


def test_a_second_run_on_a_live_workdir_is_refused_and_a_killed_run_leaves_no_lock(text_dataset, tmp_path):
  args = args_for(text_dataset, **{"train.steps": 10_000, "checkpoint.every": 10_000, "train.eval_every": 10_000})
  first = cli(tmp_path / "run", args)
  metrics = tmp_path / "run" / "metrics.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and not metrics.exists():
    time.sleep(0.1)
  code, err = run_cli(tmp_path / "run", args)
  assert code == 2 and "in use by a live run" in err and len(err.strip().splitlines()) == 1, err
  first.send_signal(signal.SIGKILL)
  first.wait()
  code, err = run_cli(tmp_path / "run", args_for(text_dataset, **{"train.steps": 2}))
  assert code == 0, err
