"""A run's folder: one live run at a time (a lock the kernel drops when its holder dies), the config it
was started with, and which changes a resume may make (how long and how often, not what is trained)."""

from __future__ import annotations

import json
from pathlib import Path


from gptoss_jax.config import ConfigError, RunConfig
from gptoss_jax.fileio import atomic_write, open_locked, release_lock

# fields a resumed run may change: how long, how often, where (the mesh, the platform) and how much memory; every other field
# (model, data, seed, optimizer, batch) decides what is trained, and a resume that changes it is refused
RESUMABLE = ("train.steps", "train.stop_at", "train.eval_every", "train.eval_batches", "train.remat",
             "model.platform", "checkpoint.*", "log.*", "mesh.*", "distributed.*")


class RunLock:
  """An exclusive lock on DIR/lock while the run lives; a second run on the same folder is refused. A run
  that wrote nothing else (it failed to start) leaves nothing: the lock goes, and DIR if the lock made it."""

  def __init__(self, workdir: Path, enabled: bool = True):
    self.path, self.enabled, self.file, self.made_dir = workdir / "lock", enabled, None, False

  def __enter__(self):
    if not self.enabled:
      return self
    self.made_dir = not self.path.parent.exists()
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.file = open_locked(self.path, blocking=False)
    if self.file is None:
      raise ConfigError(f"{self.path.parent} is in use by a live run; wait for it or stop it")
    return self

  def __exit__(self, *exc):
    if self.file:
      alone = [p.name for p in self.path.parent.iterdir()] == ["lock"]
      release_lock(self.file, remove=alone)
      if alone and self.made_dir:
        self.path.parent.rmdir()


def flat(config: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in config.items():
    if isinstance(value, dict):
      out |= flat(value, f"{prefix}{key}.")
    else:
      out[f"{prefix}{key}"] = value
  return out


def resumable(key: str) -> bool:
  return any(key == r or (r.endswith(".*") and key.startswith(r[:-1])) for r in RESUMABLE)


def has_checkpoint(workdir: Path) -> bool:
  folder = workdir / "checkpoints"
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def refuse_changed_config(workdir: Path, config: RunConfig) -> None:
  """A run resumed with a config that changes what is trained gets one line naming the fields."""
  saved_path = workdir / "config.json"
  if not (has_checkpoint(workdir) and saved_path.is_file()):
    return
  saved, new = flat(json.loads(saved_path.read_text())), flat(config.to_dict())
  differ = sorted(k for k in saved.keys() & new.keys() if saved[k] != new[k] and not resumable(k))
  if differ:
    changes = ", ".join(f"{k} {saved[k]!r} -> {new[k]!r}" for k in differ)
    raise ConfigError(f"{workdir} holds a run with another config ({changes}); a resume may change only "
                      f"{', '.join(RESUMABLE)}: use another --workdir")


def write_config(workdir: Path, config: RunConfig) -> None:
  """DIR/config.json, replaced atomically (a kill mid-write leaves the previous one)."""
  atomic_write(workdir / "config.json", json.dumps(config.to_dict(), indent=2))
