"""Writing folders all at once: nothing half-written is ever left where a reader would look; lock files
that go when they are released; and the cache folder downloads and built kernels share."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
  """$GPTOSS_JAX_CACHE, else ~/.cache/gptoss_jax: the corpus, vocabularies, prepared data, CPU kernels, the
  inference commands' compiled programs."""
  return Path(os.environ.get("GPTOSS_JAX_CACHE", Path.home() / ".cache" / "gptoss_jax"))


@contextlib.contextmanager
def atomic_folder(dst: str | Path, replace: bool = False) -> Iterator[Path]:
  """Yields a temporary folder beside `dst`, renamed to `dst` when the block succeeds and removed if it
  fails. An existing non-empty `dst` is an error unless `replace`."""
  dst = Path(dst).absolute()
  if dst.exists() and any(dst.iterdir()) and not replace:
    raise FileExistsError(f"{dst} exists and is not empty")
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
  try:
    yield tmp
    if dst.exists():
      shutil.rmtree(dst)
    tmp.rename(dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path: str | Path, text: str) -> None:
  """Replaces a file's contents at once: a reader (or a kill mid-write) sees the old or the new text."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def open_locked(path: Path, blocking: bool = True):
  """`path` opened and exclusively locked (flock), created if missing; None if another process holds it and
  not `blocking`. The holder may delete the file before releasing it (release_lock): a process that locked
  the deleted file finds it no longer at `path` and tries again."""
  while True:
    file = open(path, "a")
    try:
      fcntl.flock(file, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
      file.close()
      return None
    try:
      if os.stat(path).st_ino == os.fstat(file.fileno()).st_ino:
        return file
    except FileNotFoundError:
      pass
    file.close()


def release_lock(file, remove: bool = True) -> None:
  """Unlocks a file from open_locked, deleting it first (while still held) unless told not to."""
  if remove:
    Path(file.name).unlink(missing_ok=True)
  fcntl.flock(file, fcntl.LOCK_UN)
  file.close()
