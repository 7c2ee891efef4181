"""python -m gptoss_jax.evaluate --ckpt DIR (--text FILE | --dataset PREPARED_DIR [--split test|val|train])
    [--seq-len N | --lengths N,N,...] [--stream --cache N] [--plot FILE.png] [--batch B] [--step N]
    [--vocab-file FILE] [--json] [--config.model.FIELD=VALUE ...]

Loss, perplexity, bits per byte and token count of a checkpoint (from training or conversion) on a text
file or on a split of a prepared dataset (default: test): non-overlapping windows of seq_len + 1 tokens,
every token after the first of a window predicted once; and the mean loss by position in the window, in
buckets of powers of two (position p predicts token p + 1 from p + 1 tokens).

--lengths evaluates at each length (past the training length: length generalisation); a model with learned
positions is refused past its table (model.max_seq_len). --stream --cache N reads each window in chunks
with a KV cache of only the last N positions in every layer (full layers too), as a model run past its
memory would: every query sees its last N keys. --config.model.* changes model fields that keep the
weights' shapes, e.g. YaRN at evaluation: --config.model.position=yarn --config.model.rope_factor=8
(rope_original_max_len defaults to the training length there). --plot draws loss against position, one
line per length.
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

from gptoss_jax.config import ROTARY, ConfigError

from gptoss_jax.config_files import parse_override_args
from gptoss_jax.data.pipeline import split_tokens
from gptoss_jax.data.prepare import load_meta
from gptoss_jax.data.tokenizers import Tokenizer, get_tokenizer
from gptoss_jax.model.platform import target
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
# --seq-len's default on CPU at most: gpt-oss-20b's 24 layers peaked at 16.0 GiB of host memory in windows of
# 4,096 (a conversion's default), 14.4 GiB in windows of 1,024 and 13.9 GiB in windows of 512
# (benchmarks/gpt_oss_memory.py): only the last fits a 16 GB machine beside its operating system
CPU_WINDOW = 512


@jax.jit
def position_nll(model, windows_BxT1):
  """[B, T]: each position's next-token loss (position t predicts token t + 1), the logits never whole
  (`unembed_nll`)."""
  x_BxTxD, _, _ = model.trunk(windows_BxT1[:, :-1])
  return unembed_nll(x_BxTxD, model.unembedding(), windows_BxT1[:, 1:], target(model.cfg))


@jax.jit
def _chunk_nll(model, tokens_BxC, targets_BxC, positions_BxC, cache):
  x_BxCxD, _, cache = model.trunk(tokens_BxC, positions_BxC, cache)
  return unembed_nll(x_BxCxD, model.unembedding(), targets_BxC, target(model.cfg)), cache


STREAM_CHUNK = 256  # most positions per call when streaming


def stream_position_nll(model, windows_BxT1, cache_len: int):
  """position_nll read in chunks through a KV cache of cache_len slots in every layer (a sliding layer keeps
  the smaller of its window and cache_len): every query sees only its last cache_len keys."""
  B, T = windows_BxT1.shape[0], windows_BxT1.shape[1] - 1
  cache = model.init_cache(B, cache_len)
  chunk = min(cache_len, STREAM_CHUNK)
  parts = []
  for start in range(0, T, chunk):
    end = min(start + chunk, T)
    positions_BxC = jnp.broadcast_to(jnp.arange(start, end, dtype=jnp.int32), (B, end - start))
    nll, cache = _chunk_nll(model, windows_BxT1[:, start:end], windows_BxT1[:, start + 1:end + 1], positions_BxC, cache)
    parts.append(nll)
  return jnp.concatenate(parts, axis=1)


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
  """[start, end) position ranges: 0, 1, 2-3, 4-7, ... (powers of two), the last ending at seq_len."""
  edges = [0] + [2 ** k for k in range(max(seq_len - 1, 1).bit_length())] + [seq_len]
  return [(a, b) for a, b in zip(edges, edges[1:]) if a < b]


def evaluate_tokens(model, tokens: np.ndarray, seq_len: int, batch: int, byte_lengths: np.ndarray,
                    progress: bool = True, stream_cache: int = 0) -> dict:
  """The loss over non-overlapping windows of seq_len + 1 tokens, and by position (`position_buckets`);
  with stream_cache, read through a cache of that many positions (`stream_position_nll`)."""
  n_windows = (len(tokens) - 1) // seq_len
  if n_windows == 0:
    raise ConfigError(f"{len(tokens)} tokens are fewer than seq_len + 1 = {seq_len + 1}")
  windows = np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(n_windows)]).astype(np.int32)

  iterator = range(0, n_windows, batch)
  if progress:
    from tqdm import tqdm
    iterator = tqdm(iterator, desc=f"evaluating at {seq_len}", unit="batch", file=sys.stderr)
  by_position = np.zeros(seq_len, np.float64)  # summed over windows
  for start in iterator:
    w = windows[start:start + batch]
    pad = batch - len(w)  # one compiled shape: pad the last batch, drop its padding rows
    w_BxT1 = jnp.asarray(np.pad(w, ((0, pad), (0, 0))))
    nll = stream_position_nll(model, w_BxT1, stream_cache) if stream_cache else position_nll(model, w_BxT1)
    by_position += np.asarray(nll, np.float64)[:len(w)].sum(axis=0)
  total = float(by_position.sum())
  targets = windows[:, 1:]
  n_tokens = targets.size
  n_bytes = int(byte_lengths[targets].sum())
  loss = total / n_tokens
  buckets = [{"from": a, "to": b, "loss": float(by_position[a:b].sum() / (n_windows * (b - a)))}
             for a, b in position_buckets(seq_len)]
  return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": total / math.log(2) / max(n_bytes, 1),
          "tokens": int(n_tokens), "bytes": n_bytes, "seq_len": seq_len, "windows": n_windows,
          "stream_cache": stream_cache, "by_position": buckets}


def bucket_axis(ax, buckets: list[dict]) -> list[float]:
  """Puts `ax`'s x axis on a log scale ticked with the buckets' first positions (bucket 0 drawn at 1/2);
  returns the x of each bucket."""
  xs = [max(b["from"], 0.5) for b in buckets]
  ax.set_xscale("log", base=2)
  ax.set_xticks(xs, [str(b["from"]) for b in buckets])
  ax.minorticks_off()
  return xs


def plot_by_position(results: dict[str, dict], path: Path, title: str = "") -> Path:
  """Loss against position (the buckets' mean, at each bucket's first position), one line per result."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, result in results.items():
    ax.plot(bucket_axis(ax, result["by_position"]), [b["loss"] for b in result["by_position"]], marker="o", label=label)
  ax.set_xlabel("position in the window (bucket start)")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(title or "loss by position")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def check_length(cfg, seq_len: int) -> None:
  """Learned absolute positions stop at their table; rotary ones go on (how well is what is measured)."""
  if seq_len <= 0:
    raise ConfigError(f"lengths must be >= 1, got {seq_len}")
  if cfg.position == "learned" and seq_len > cfg.max_seq_len:
    raise ConfigError(f"length {seq_len}: the model's learned positions stop at model.max_seq_len = "
                      f"{cfg.max_seq_len} (a rotary model can be evaluated past its training length)")


def default_seq_len(config) -> int:
  """The checkpoint's data.seq_len, capped at CPU_WINDOW on CPU (said on stderr when it is)."""
  if jax.default_backend() != "cpu" or config.data.seq_len <= CPU_WINDOW:
    return config.data.seq_len
  print(f"note: windows of {CPU_WINDOW:,} tokens on CPU, not the checkpoint's {config.data.seq_len:,} (its memory; "
        "--seq-len to choose)", file=sys.stderr)
  return CPU_WINDOW


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m gptoss_jax.evaluate", description=__doc__.split("\n\n")[0],
                                   epilog="--config.model.FIELD=VALUE: a model field that keeps the weights' shapes")
  parser.add_argument("--ckpt", required=True, help="a training workdir or a converted checkpoint")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--text", help="a UTF-8 text file")
  source.add_argument("--dataset", help="a folder made by gptoss_jax.data.prepare (its --split)")
  parser.add_argument("--split", default="test", choices=("test", "val", "train"),
                      help="the prepared dataset's split (default: test)")
  lengths = parser.add_mutually_exclusive_group()
  lengths.add_argument("--seq-len", type=int, default=None, help="default: the checkpoint's data.seq_len (a "
                       f"training's length; a conversion's context, at most 4,096), on CPU at most {CPU_WINDOW:,}")
  lengths.add_argument("--lengths", default="", help="comma-separated lengths, each evaluated (e.g. 128,256,512,1024)")
  parser.add_argument("--stream", action="store_true", help="read each window through a KV cache of --cache positions")
  parser.add_argument("--cache", type=int, default=0, help="with --stream: positions every layer's cache keeps")
  parser.add_argument("--plot", default="", help="a PNG of loss against position, one line per length")
  parser.add_argument("--batch", type=int, default=None, help=f"windows at a time (default: {BATCH_TOKENS:,} "
                      "tokens' worth, at least 1)")
  parser.add_argument("--vocab-file", default="", help="local .tiktoken file for the checkpoint's tokenizer")
  parser.add_argument("--step", type=int, default=None, help="an older checkpoint of the run (default: the newest)")
  parser.add_argument("--json", action="store_true")
  return parser


def parse_lengths(text: str) -> list[int]:
  try:
    lengths = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ConfigError(f"--lengths: cannot read {text!r} as comma-separated integers") from None
  if not lengths:
    raise ConfigError("--lengths: no length given")
  return lengths


def scaling_overrides(config, overrides: dict[str, str]) -> dict[str, str]:
  """Switching a rotary model to YaRN or Llama 3 scaling at evaluation: the original length it scales from is
  the training length unless given (the field's default is gpt-oss's 4,096)."""
  wanted = overrides.get("model.position", config.model.position)
  if wanted in ROTARY and not config.model.is_rotary:
    raise ConfigError(f"--config.model.position={wanted} on a checkpoint trained with {config.model.position} "
                      "positions: it would rotate queries and keys as the model never saw")
  switched = overrides.get("model.position") in ("yarn", "llama3") and config.model.position == "rope"
  if switched and "model.rope_original_max_len" not in overrides:
    print(f"note: {overrides['model.position']} from the training length, rope_original_max_len = "
          f"{config.data.seq_len} (--config.model.rope_original_max_len to change)", file=sys.stderr)
    return overrides | {"model.rope_original_max_len": str(config.data.seq_len)}
  return overrides


def read_tokens(args, config, cfg) -> tuple[np.ndarray, Tokenizer]:
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
  return tokens, tokenizer


def main(argv: list[str] | None = None) -> int:
  args, rest = _parser().parse_known_args(argv)
  try:
    from gptoss_jax.weights import load_model, read_config
    if args.stream != (args.cache > 0):
      raise ConfigError("--stream and --cache N (N >= 1) go together")
    overrides = scaling_overrides(read_config(args.ckpt), parse_override_args(rest)) if rest else {}
    config, cfg, model = load_model(args.ckpt, args.step, overrides)
    lengths = parse_lengths(args.lengths) if args.lengths else [args.seq_len or default_seq_len(config)]
    for seq_len in lengths:
      check_length(cfg, seq_len)
    if args.batch is not None and args.batch <= 0:
      raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    tokens, tokenizer = read_tokens(args, config, cfg)
    byte_lengths = token_byte_lengths(tokenizer)
    results = {}
    for seq_len in lengths:
      began = time.perf_counter()
      batch = max(1, BATCH_TOKENS // seq_len) if args.batch is None else args.batch
      results[seq_len] = evaluate_tokens(model, tokens, seq_len, batch, byte_lengths, stream_cache=args.cache)
      print(f"{results[seq_len]['tokens']:,} tokens in {time.perf_counter() - began:.1f} s: "
            f"{results[seq_len]['tokens'] / (time.perf_counter() - began):,.0f} tokens/s (compilation included)",
            file=sys.stderr)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.plot:
    kind = f"streamed through a cache of {args.cache}" if args.stream else "whole windows"
    plot_by_position({f"length {n}": r for n, r in results.items()}, Path(args.plot),
                     f"{Path(args.ckpt).name}: loss by position, {kind}")
  if args.json:
    print(json.dumps({"lengths": {str(n): r for n, r in results.items()}} if args.lengths else results[lengths[0]]))
  else:
    for n, r in results.items():
      print(f"length {n}: loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}  "
            f"bits/byte {r['bits_per_byte']:.4f}  tokens {r['tokens']:,}")
  return 0


if __name__ == "__main__":
  from gptoss_jax import runtime
  runtime.configure()  # before JAX starts its backend
  runtime.inference_memory()
  runtime.cache_compilations()
  runtime.reuse_step_memory()  # every forward pass reuses its temporaries' memory (README: Benchmarks)
  sys.exit(main())
