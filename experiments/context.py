"""python -m experiments.context FOLDER [FOLDER ...]

The `context` sweep's evaluation of a trained model past its training length T, on its test split: the
loss and loss by position at 1x, 2x, 4x and 8x T (non-overlapping windows); for a rotary model, the same at
2x-8x with YaRN switched on at evaluation (factor = the multiple, from T); and streamed over windows of
8x T through a KV cache of T positions in every layer. Written to FOLDER/evaluation.json. FOLDER is a
training, or a sweep folder (every compared training in it without the file). The sweep runner calls it
after each compared training of the `context` sweep. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gptoss_jax.config import ConfigError

MULTIPLES = (1, 2, 4, 8)
BATCH_TOKENS = 16384  # tokens per evaluation call (tiny models: fewer, larger calls)


def measure(folder: Path, multiples: tuple[int, ...] = MULTIPLES) -> dict:
  """{"seq_len": T, "plain": {length: result}, "yarn": {length: result}, "stream": result}, each result
  `evaluate_tokens`' (loss, by_position, ...)."""
  from gptoss_jax.data.pipeline import split_tokens
  from gptoss_jax.data.prepare import dataset_dir
  from gptoss_jax.data.tokenizers import get_tokenizer
  from gptoss_jax.evaluate import check_length, evaluate_tokens, token_byte_lengths
  from gptoss_jax.weights import load_model
  config, cfg, model = load_model(folder)
  T = config.data.seq_len
  lengths = [k * T for k in multiples]
  for n in lengths:
    check_length(cfg, n)
  tokens = split_tokens(dataset_dir(config.data), "test")
  byte_lengths = token_byte_lengths(get_tokenizer(config.data.tokenizer, config.data.vocab_file))

  def evaluate(m, n: int, cache: int = 0) -> dict:
    return evaluate_tokens(m, tokens, n, max(1, BATCH_TOKENS // n), byte_lengths, progress=False, stream_cache=cache)

  out = {"seq_len": T, "plain": {str(n): evaluate(model, n) for n in lengths}, "yarn": {},
         "stream": evaluate(model, lengths[-1], cache=T)}
  if cfg.position == "rope":
    for k, n in zip(multiples, lengths):
      if k > 1:
        yarn = {"model.position": "yarn", "model.rope_factor": str(float(k)), "model.rope_original_max_len": str(T)}
        out["yarn"][str(n)] = evaluate(load_model(folder, overrides=yarn)[2], n)
  return out


def folders(path: Path) -> list[Path]:
  """A training folder, or a sweep folder's compared trainings that lack the file."""
  if (path / "sweep.json").is_file():
    return sorted(p for p in path.glob("*/seed*") if (p / "checkpoints").is_dir() and not (p / "evaluation.json").is_file())
  if not (path / "config.json").is_file():
    raise ConfigError(f"{path} is neither a training folder nor a sweep folder")
  return [path]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.context", description=__doc__.split("\n\n")[0])
  parser.add_argument("folders", nargs="+", help="training or sweep folders")
  args = parser.parse_args(argv)
  try:
    todo = [f for path in args.folders for f in folders(Path(path))]
    for folder in todo:
      result = measure(folder)
      (folder / "evaluation.json.tmp").write_text(json.dumps(result))
      (folder / "evaluation.json.tmp").replace(folder / "evaluation.json")
      print(f"{folder}: " + ", ".join(f"{n}: {r['loss']:.4f}" for n, r in result["plain"].items())
            + f"; streamed {result['stream']['loss']:.4f}", file=sys.stderr)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  from gptoss_jax import runtime
  runtime.configure()
  sys.exit(main())
