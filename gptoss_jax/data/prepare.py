"""Text -> tokens on disk: `train.bin` and `val.bin` (flat uint16/uint32 token streams) + `meta.json`.

  python -m gptoss_jax.data.prepare --source shakespeare --tokenizer byte --out DIR
      [--path GLOB] [--vocab-file FILE] [--eval-fraction 0.01]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from gptoss_jax.config import ConfigError
from gptoss_jax.data.sources import SOURCES, documents
from gptoss_jax.data.tokenizers import TOKENIZERS, get_tokenizer
from gptoss_jax.fileio import atomic_folder


def prepare(out: str | Path, source: str, tokenizer: str, path: str = "", vocab_file: str = "",
            eval_fraction: float = 0.01, hf_split: str = "train", hf_field: str = "text",
            progress: bool = True) -> dict:
  """Writes the dataset to `out` atomically (a temporary folder renamed at the end); returns meta."""
  if not 0 < eval_fraction < 0.5:
    raise ConfigError(f"data.eval_fraction must be in (0, 0.5), got {eval_fraction}")
  tok = get_tokenizer(tokenizer, vocab_file)
  dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
  with atomic_folder(out, replace=True) as tmp:
    chunks, n_docs = [], 0
    for doc in _progress(documents(source, path, hf_split, hf_field), progress, "tokenizing"):
      ids = tok.encode(doc) + ([tok.eot_id] if tok.eot_id is not None else [])
      chunks.append(np.asarray(ids, dtype))
      n_docs += 1
    tokens = np.concatenate(chunks) if chunks else np.zeros((0,), dtype)
    n_val = max(int(len(tokens) * eval_fraction), 1)
    if len(tokens) - n_val < 2:
      raise ConfigError(f"data source {source!r} {path!r} holds only {len(tokens)} tokens")
    tokens[:-n_val].tofile(tmp / "train.bin")
    tokens[-n_val:].tofile(tmp / "val.bin")
    meta = {"source": source, "path": path, "tokenizer": tokenizer, "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name, "documents": n_docs, "train_tokens": int(len(tokens) - n_val),
            "val_tokens": n_val}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
  return meta


def _progress(iterable, enabled: bool, desc: str):
  if not enabled:
    return iterable
  from tqdm import tqdm
  return tqdm(iterable, desc=desc, unit="doc", file=sys.stderr)


def load_meta(folder: str | Path) -> dict:
  path = Path(folder) / "meta.json"
  if not path.is_file():
    raise ConfigError(f"{folder} is not a prepared dataset (no meta.json); run python -m gptoss_jax.data.prepare")
  return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gptoss_jax.data.prepare", description=__doc__.split("\n\n")[0])
  parser.add_argument("--source", default="shakespeare", choices=SOURCES)
  parser.add_argument("--path", default="", help="text: path or glob (comma-separated); hf: name[:config]")
  parser.add_argument("--tokenizer", default="byte", choices=TOKENIZERS)
  parser.add_argument("--vocab-file", default="", help="local .tiktoken file (no internet needed)")
  parser.add_argument("--eval-fraction", type=float, default=0.01)
  parser.add_argument("--hf-split", default="train")
  parser.add_argument("--hf-field", default="text")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  try:
    meta = prepare(args.out, args.source, args.tokenizer, args.path, args.vocab_file, args.eval_fraction,
                   args.hf_split, args.hf_field)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(meta))
  return 0


if __name__ == "__main__":
  sys.exit(main())
