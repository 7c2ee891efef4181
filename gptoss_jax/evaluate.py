"""python -m gptoss_jax.evaluate --ckpt DIR (--text FILE | --dataset PREPARED_DIR [--split test|val|train]) [--seq-len N] [--batch B] [--step N]
    [--vocab-file FILE] [--json]

Loss, perplexity, bits per byte and token count of a checkpoint (from training or conversion) on a text
file or on a split of a prepared dataset (default: test): non-overlapping windows of seq_len + 1 tokens,
every token after the first of a window predicted once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.config import ConfigError
from gptoss_jax.data.pipeline import split_tokens
from gptoss_jax.data.prepare import load_meta
from gptoss_jax.data.tokenizers import Tokenizer, get_tokenizer
from gptoss_jax.model.transformer import unembed_nll


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
  """UTF-8 bytes each token id stands for (for bits per byte)."""
  if tokenizer.name == "byte":
    return np.ones(256, np.int64)
  enc = tokenizer.encoding
  lengths = np.zeros(tokenizer.vocab_size, np.int64)
  for i in range(tokenizer.vocab_size):
    try:
      lengths[i] = len(enc.decode_single_token_bytes(i))
    except KeyError:  # unused ids
      pass
  return lengths


BATCH_TOKENS = 4096  # --batch's default: this many tokens at a time


@jax.jit
def summed_nll(model, windows_BxT1):
  """Each window's summed next-token loss (its first token predicts the second, ...), the logits never
  whole (`unembed_nll`)."""
  x_BxTxD, _, _ = model.trunk(windows_BxT1[:, :-1])
  return jnp.sum(unembed_nll(x_BxTxD, model.unembedding(), windows_BxT1[:, 1:]), axis=-1)


def evaluate_tokens(model, tokens: np.ndarray, seq_len: int, batch: int, byte_lengths: np.ndarray,
                    progress: bool = True) -> dict:
  n_windows = (len(tokens) - 1) // seq_len
  if n_windows == 0:
    raise ConfigError(f"{len(tokens)} tokens are fewer than seq_len + 1 = {seq_len + 1}")
  windows = np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(n_windows)]).astype(np.int32)

  iterator = range(0, n_windows, batch)
  if progress:
    from tqdm import tqdm
    iterator = tqdm(iterator, desc="evaluating", unit="batch", file=sys.stderr)
  total = 0.0
  for start in iterator:
    w = windows[start:start + batch]
    pad = batch - len(w)  # one compiled shape: pad the last batch, drop its padding rows
    nll = np.asarray(summed_nll(model, jnp.asarray(np.pad(w, ((0, pad), (0, 0))))))
    total += float(nll[:len(w)].sum(dtype=np.float64))
  targets = windows[:, 1:]
  n_tokens = targets.size
  n_bytes = int(byte_lengths[targets].sum())
  loss = total / n_tokens
  return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": total / math.log(2) / max(n_bytes, 1),
          "tokens": int(n_tokens), "bytes": n_bytes}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gptoss_jax.evaluate", description=__doc__.split("\n\n")[0])
  parser.add_argument("--ckpt", required=True, help="a training workdir or a converted checkpoint")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--text", help="a UTF-8 text file")
  source.add_argument("--dataset", help="a folder made by gptoss_jax.data.prepare (its --split)")
  parser.add_argument("--split", default="test", choices=("test", "val", "train"),
                      help="the prepared dataset's split (default: test)")
  parser.add_argument("--seq-len", type=int, default=None, help="default: the checkpoint's data.seq_len (a "
                      "training's length; a conversion's context, at most 4,096)")
  parser.add_argument("--batch", type=int, default=None, help=f"windows at a time (default: {BATCH_TOKENS:,} "
                      "tokens' worth, at least 1)")
  parser.add_argument("--vocab-file", default="", help="local .tiktoken file for the checkpoint's tokenizer")
  parser.add_argument("--step", type=int, default=None, help="an older checkpoint of the run (default: the newest)")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  try:
    from gptoss_jax.weights import load_model
    config, cfg, model = load_model(args.ckpt, args.step)
    seq_len = args.seq_len or config.data.seq_len
    batch = max(1, BATCH_TOKENS // seq_len) if args.batch is None else args.batch
    if not 0 < seq_len <= cfg.max_seq_len or batch <= 0:
      raise ConfigError(f"--seq-len must be in 1..{cfg.max_seq_len} and --batch > 0")
    if args.text:
      if not Path(args.text).is_file():
        raise ConfigError(f"--text: no such file: {args.text}")
      tokenizer = get_tokenizer(config.data.tokenizer, args.vocab_file or config.data.vocab_file)
      tokens = np.asarray(tokenizer.encode(Path(args.text).read_text(encoding="utf-8")), np.int64)
    else:
      meta = load_meta(args.dataset)
      tokenizer = get_tokenizer(meta["tokenizer"], args.vocab_file or config.data.vocab_file)
      tokens = split_tokens(args.dataset, args.split).astype(np.int64)
    if len(tokens) and tokens.max() >= cfg.vocab_size:
      raise ConfigError(f"token id {tokens.max()} ({tokenizer.name} tokenizer) is outside the model's "
                        f"vocabulary of {cfg.vocab_size}")
    began = time.perf_counter()
    result = evaluate_tokens(model, tokens, seq_len, batch, token_byte_lengths(tokenizer))
    print(f"{result['tokens']:,} tokens in {time.perf_counter() - began:.1f} s: "
          f"{result['tokens'] / (time.perf_counter() - began):,.0f} tokens/s (compilation included)", file=sys.stderr)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(result))
  else:
    print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
          f"bits/byte {result['bits_per_byte']:.4f}  tokens {result['tokens']:,}")
  return 0


if __name__ == "__main__":
  from gptoss_jax import runtime
  runtime.configure()  # before JAX starts its backend
  runtime.inference_memory()
  runtime.reuse_step_memory()  # every forward pass reuses its temporaries' memory (README: Benchmarks)
  sys.exit(main())
