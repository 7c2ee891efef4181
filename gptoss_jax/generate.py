"""python -m gptoss_jax.generate --ckpt DIR --prompt "..." [--step N] [--max-new-tokens N] [--temperature T] [--top-p P]
    [--seed S] [--chat] [--reasoning-effort low|medium|high]

Incremental decoding with a KV cache (sliding-window layers keep only their window, sinks honoured): the
prompt fed in pieces of a few fixed lengths (PREFILL_CHUNKS: a handful of compiled programs whatever the
prompt's length) and one compiled step for every new token, tokens streamed to the terminal as they come;
the token counts and speeds at the end, on stderr. --chat renders gpt-oss's harmony chat format with the
reasoning line.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gptoss_jax.config import ConfigError

HARMONY_STOP = ("<|return|>", "<|call|>")


def sample(logits_V: jax.Array, key: jax.Array, temperature: float, top_p: float, n_valid: int = 0) -> jax.Array:
  """Greedy at temperature 0; otherwise nucleus sampling over the smallest set with mass >= top_p. Only
  the first `n_valid` ids can be chosen (0: all): a vocabulary padded past its tokenizer's (GPT-2's 50,257
  to 50,304) has ids no tokenizer can decode."""
  V = logits_V.shape[-1]
  if 0 < n_valid < V:
    logits_V = jnp.where(jnp.arange(V) < n_valid, logits_V, -jnp.inf)
  if temperature <= 0:
    return jnp.argmax(logits_V, axis=-1)
  logits = logits_V.astype(jnp.float32) / temperature
  if top_p < 1.0:
    order = jnp.argsort(-logits)
    probs = jax.nn.softmax(logits[order])
    keep = jnp.cumsum(probs) - probs < top_p  # the first token is always kept
    logits = jnp.full_like(logits, -jnp.inf).at[order].set(jnp.where(keep, logits[order], -jnp.inf))
  return jax.random.categorical(key, logits)


# a prompt is fed in pieces of these lengths (as many of the first as fit, then the binary digits of the
# rest): whatever the prompt's length, at most these few prefill programs are ever compiled
PREFILL_CHUNKS = (256, 128, 64, 32, 16, 8, 4, 2, 1)


def prefill_chunks(n: int) -> list[int]:
  out, rest = [PREFILL_CHUNKS[0]] * (n // PREFILL_CHUNKS[0]), n % PREFILL_CHUNKS[0]
  for size in PREFILL_CHUNKS[1:]:
    if rest >= size:
      out.append(size)
      rest -= size
  return out


def extend(model, tokens_1xC, start, cache):
  """A piece of the prompt through the model at positions start.., into the KV cache; the last position's
  logits."""
  positions = start + jnp.arange(tokens_1xC.shape[1], dtype=jnp.int32)[None]
  out = model.forward(tokens_1xC, positions, cache)
  return out.logits_BxTxV[0, -1], out.cache


def decode_step(model, token, position, cache, key, temperature: float, top_p: float, n_valid: int = 0):
  """One new token: the last one through the model at `position` with the KV cache, then sampled."""
  out = model.forward(token[None, None], position[None, None], cache)
  return sample(out.logits_BxTxV[0, -1], key, temperature, top_p, n_valid), out.cache


_extend = jax.jit(extend)
_sample = jax.jit(sample, static_argnames=("temperature", "top_p", "n_valid"))
_decode_step = jax.jit(decode_step, static_argnames=("temperature", "top_p", "n_valid"))


def generate(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, stop_ids: tuple[int, ...] = (), on_token: Callable[[int], None] | None = None,
             timing: dict | None = None, n_valid: int = 0) -> list[int]:
  """New tokens after the prompt (greedy at temperature 0), each among the first `n_valid` ids (0: the
  whole vocabulary; give the tokenizer's size when the model's vocabulary is padded past it). `timing`, if
  given, receives the prefill and decode seconds (each including its first compilation)."""
  cfg = model.cfg
  total = len(prompt_ids) + max_new_tokens
  if not prompt_ids:
    raise ConfigError("the prompt is empty")
  if total > cfg.max_seq_len:
    raise ConfigError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                      f"max_seq_len ({cfg.max_seq_len})")
  sampling = dict(temperature=temperature, top_p=top_p, n_valid=n_valid)
  keys = jax.random.split(jax.random.key(seed), max_new_tokens)
  began = time.perf_counter()
  cache, start, prompt = model.init_cache(1, total), 0, jnp.asarray([prompt_ids], jnp.int32)
  for size in prefill_chunks(len(prompt_ids)):
    logits, cache = _extend(model, prompt[:, start:start + size], jnp.asarray(start, jnp.int32), cache)
    start += size
  token = _sample(logits, keys[0], **sampling).block_until_ready()
  prefilled = time.perf_counter()
  new = []
  for i in range(max_new_tokens):
    new.append(int(token))
    if on_token:
      on_token(new[-1])
    if new[-1] in stop_ids or i == max_new_tokens - 1:
      break
    token, cache = _decode_step(model, token.astype(jnp.int32), jnp.asarray(len(prompt_ids) + i, jnp.int32), cache,
                                keys[i + 1], **sampling)
  if timing is not None:
    timing |= {"prefill_s": prefilled - began, "decode_s": time.perf_counter() - prefilled}
  return new


def harmony_prompt(user: str, reasoning_effort: str = "medium") -> str:
  today = datetime.date.today().isoformat()
  system = ("You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n"
            f"Current date: {today}\n\nReasoning: {reasoning_effort}\n\n"
            "# Valid channels: analysis, commentary, final. Channel must be included for every message.")
  return (f"<|start|>system<|message|>{system}<|end|><|start|>user<|message|>{user}<|end|>"
          "<|start|>assistant")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gptoss_jax.generate", description=__doc__.split("\n\n")[0])
  parser.add_argument("--ckpt", required=True)
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--max-new-tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.8)
  parser.add_argument("--top-p", type=float, default=0.95)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--chat", action="store_true", help="harmony chat format (gpt-oss checkpoints)")
  parser.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="medium")
  parser.add_argument("--vocab-file", default="", help="local .tiktoken file for the checkpoint's tokenizer")
  parser.add_argument("--step", type=int, default=None, help="an older checkpoint of the run (default: the newest)")
  args = parser.parse_args(argv)
  try:
    if args.max_new_tokens <= 0 or not 0 < args.top_p <= 1 or args.temperature < 0:
      raise ConfigError("--max-new-tokens must be > 0, --top-p in (0, 1], --temperature >= 0")
    from gptoss_jax.data.tokenizers import get_tokenizer
    from gptoss_jax.weights import load_model
    config, cfg, model = load_model(args.ckpt, args.step)
    tokenizer = get_tokenizer(config.data.tokenizer, args.vocab_file or config.data.vocab_file)
    stop_ids: tuple[int, ...] = ()
    if args.chat:
      if tokenizer.name != "o200k_harmony":
        raise ConfigError(f"--chat needs a gpt-oss checkpoint (o200k_harmony tokens), this one uses {tokenizer.name}")
      enc = tokenizer.encoding
      prompt_ids = enc.encode(harmony_prompt(args.prompt, args.reasoning_effort), allowed_special="all")
      stop_ids = tuple(enc.encode_single_token(t) for t in HARMONY_STOP)
    else:
      prompt_ids = tokenizer.encode(args.prompt)
    if max(prompt_ids, default=0) >= cfg.vocab_size:
      raise ConfigError(f"the prompt has token ids outside the model's vocabulary of {cfg.vocab_size}")
    printed = [""]
    new: list[int] = []

    def stream(token: int):
      new.append(token)
      text = tokenizer.decode(new)
      sys.stdout.write(text[len(printed[0]):])
      sys.stdout.flush()
      printed[0] = text

    sys.stdout.write(args.prompt if not args.chat else "")
    timing = {}
    generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_p, args.seed, stop_ids, stream, timing,
             n_valid=tokenizer.vocab_size)
    sys.stdout.write("\n")
    print(f"prompt {len(prompt_ids)} tokens, prefill {len(prompt_ids) / timing['prefill_s']:,.1f} tokens/s; "
          f"generated {len(new)} tokens, decode {max(len(new) - 1, 1) / max(timing['decode_s'], 1e-9):,.2f} tokens/s "
          "(first compilations included)", file=sys.stderr)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  from gptoss_jax import runtime
  runtime.configure()  # before JAX starts its backend
  runtime.reuse_step_memory()  # every forward pass reuses its temporaries' memory (README: Benchmarks)
  sys.exit(main())
