"""A run's folder: one live run at a time (a lock the kernel drops when its holder dies), the config it
was started with, and which changes a resume may make (how long and how often, not what is trained)."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path


from gptoss_jax.config import ConfigError, RunConfig
from gptoss_jax.fileio import atomic_write

# fields a resumed run may change: how long, how often, where (the mesh, the platform) and how much memory; every other field
# (model, data, seed, optimizer, batch) decides what is trained, and a resume that changes it is refused
RESUMABLE = ("train.steps", "train.stop_at", "train.eval_every", "train.eval_batches", "train.remat",
             "model.platform", "checkpoint.every", "checkpoint.keep", "checkpoint.async_save", "log.*", "mesh.*", "distributed.*")


class RunLock:
  """An exclusive lock on DIR/lock while the run lives; a second run on the same folder is refused."""

  def __init__(self, workdir: Path, enabled: bool = True):
    self.path, self.enabled, self.file = workdir / "lock", enabled, None

  def __enter__(self):
    if not self.enabled:
      return self
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.file = open(self.path, "a")  # created once, never written: the lock is the kernel's
    try:
      fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self.file.close()
      raise ConfigError(f"{self.path.parent} is in use by a live run; wait for it or stop it") from None
    return self

  def __exit__(self, *exc):
    if self.file:
      fcntl.flock(self.file, fcntl.LOCK_UN)
      self.file.close()


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
