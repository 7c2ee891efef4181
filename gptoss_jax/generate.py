"""python -m gptoss_jax.generate --ckpt DIR --prompt "..." [--step N] [--max-new-tokens N] [--temperature T] [--top-p P]
    [--seed S] [--vocab-file FILE] [--chat [--show-reasoning] [--reasoning-effort low|medium|high]]

Incremental decoding with a KV cache (sliding-window layers keep only their window, sinks honoured): the
prompt fed in pieces of a few fixed lengths (PREFILL_CHUNKS: a handful of compiled programs whatever the
prompt's length) and one compiled step for every new token, tokens streamed to the terminal as they come;
the token counts and speeds at the end, on stderr. --chat puts the prompt in gpt-oss's harmony chat format
and prints the reply's final answer (and, with --show-reasoning, its reasoning), stopping where the answer
ends.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gptoss_jax import harmony
from gptoss_jax.config import ConfigError


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
             seed: int = 0, on_token: Callable[[int], bool | None] | None = None,
             timing: dict | None = None, n_valid: int = 0, cache_len: int = 0) -> list[int]:
  """New tokens after the prompt (greedy at temperature 0), each among the first `n_valid` ids (0: the
  whole vocabulary; give the tokenizer's size when the model's vocabulary is padded past it), until
  `on_token` (called with each new token) returns True. `timing`, if given, receives the
  prefill and decode seconds (each including its first compilation). `cache_len` (at least the prompt and
  the new tokens; empty slots are never seen): a few such lengths for many prompts compile a few programs."""
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
  cache, start, prompt = model.init_cache(1, max(total, cache_len)), 0, jnp.asarray([prompt_ids], jnp.int32)
  for size in prefill_chunks(len(prompt_ids)):
    logits, cache = _extend(model, prompt[:, start:start + size], jnp.asarray(start, jnp.int32), cache)
    start += size
  token = _sample(logits, keys[0], **sampling).block_until_ready()
  prefilled = time.perf_counter()
  new = []
  for i in range(max_new_tokens):
    new.append(int(token))
    stop = on_token(new[-1]) if on_token else False
    if stop or i == max_new_tokens - 1:
      break
    token, cache = _decode_step(model, token.astype(jnp.int32), jnp.asarray(len(prompt_ids) + i, jnp.int32), cache,
                                keys[i + 1], **sampling)
  if timing is not None:
    timing |= {"prefill_s": prefilled - began, "decode_s": time.perf_counter() - prefilled}
  return new


CHAT_NEW_TOKENS = 1024  # --chat's default: the reasoning comes before the answer and often takes hundreds of tokens


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m gptoss_jax.generate", description=__doc__.split("\n\n")[0])
  parser.add_argument("--ckpt", required=True, help="a training workdir or a converted checkpoint")
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--max-new-tokens", type=int, default=None,
                      help=f"default: 128, or {CHAT_NEW_TOKENS} with --chat (either cut to the model's context)")
  parser.add_argument("--temperature", type=float, default=0.8, help="0 decodes greedily (default: %(default)s)")
  parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling's mass (default: %(default)s)")
  parser.add_argument("--seed", type=int, default=0, help="the sampling seed (default: %(default)s)")
  parser.add_argument("--chat", action="store_true", help="harmony chat format (gpt-oss checkpoints): prints the "
                                                          "reply's final answer")
  parser.add_argument("--show-reasoning", action="store_true", help="with --chat, also print the analysis channel")
  parser.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="medium",
                      help="with --chat (default: %(default)s)")
  parser.add_argument("--vocab-file", default="", help="local .tiktoken file for the checkpoint's tokenizer")
  parser.add_argument("--step", type=int, default=None, help="an older checkpoint of the run (default: the newest)")
  return parser


class TextPrinter:
  """Streams a plain continuation: each token's new text as soon as it decodes."""

  def __init__(self, tokenizer):
    self.tokenizer, self.tokens, self.printed = tokenizer, [], ""

  def __call__(self, token: int) -> bool:
    self.tokens.append(token)
    text = self.tokenizer.decode(self.tokens)
    sys.stdout.write(text[len(self.printed):])
    sys.stdout.flush()
    self.printed = text
    return False

  def notes(self) -> list[str]:
    return []


class ChatPrinter:
  """Streams a harmony reply: its final answer, after the reasoning (the analysis channel) with
  show_reasoning; says True when the reply has ended."""

  def __init__(self, encoding, show_reasoning: bool):
    self.reply, self.show_reasoning, self.shown = harmony.ReplyParser(encoding), show_reasoning, None

  def __call__(self, token: int) -> bool:
    text, message = self.reply.push(token), self.reply.current
    if text and (message.channel == "final" or self.show_reasoning):
      if message is not self.shown and self.show_reasoning:  # a new message: its channel as a heading
        sys.stdout.write(("\n\n" if self.shown else "") + f"[{message.channel or 'no channel'}]\n")
      self.shown = message
      sys.stdout.write(text)
      sys.stdout.flush()
    return self.reply.done

  def notes(self) -> list[str]:
    final = self.reply.final()
    calls = [m.recipient for m in self.reply.messages if m.ended_by == harmony.CALL]
    if calls:
      return [f"the model called a tool ({calls[-1]}), which this command does not run"]
    if final is None:
      return ["the reply stopped before its final answer: raise --max-new-tokens (--show-reasoning shows the "
              "reasoning so far)"]
    return [] if final.ended_by else ["the answer was cut off at --max-new-tokens"]


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if (args.max_new_tokens is not None and args.max_new_tokens <= 0) or not 0 < args.top_p <= 1 \
        or args.temperature < 0:
      raise ConfigError("--max-new-tokens must be > 0, --top-p in (0, 1], --temperature >= 0")
    if args.show_reasoning and not args.chat:
      raise ConfigError("--show-reasoning needs --chat")
    from gptoss_jax.data.tokenizers import get_tokenizer
    from gptoss_jax.weights import load_model
    config, cfg, model = load_model(args.ckpt, args.step)
    tokenizer = get_tokenizer(config.data.tokenizer, args.vocab_file or config.data.vocab_file)
    if args.chat:
      if tokenizer.name != "o200k_harmony":
        raise ConfigError(f"--chat needs a gpt-oss checkpoint (o200k_harmony tokens), this one uses {tokenizer.name}")
      prompt_ids = tokenizer.encoding.encode(harmony.prompt(args.prompt, args.reasoning_effort), allowed_special="all")
      printer = ChatPrinter(tokenizer.encoding, args.show_reasoning)
    else:
      prompt_ids = tokenizer.encode(args.prompt)
      printer = TextPrinter(tokenizer)
      sys.stdout.write(args.prompt)
    if max(prompt_ids, default=0) >= cfg.vocab_size:
      raise ConfigError(f"the prompt has token ids outside the model's vocabulary of {cfg.vocab_size}")
    new_tokens = args.max_new_tokens or max(1, min(CHAT_NEW_TOKENS if args.chat else 128,
                                                   cfg.max_seq_len - len(prompt_ids)))
    timing = {}
    new = generate(model, prompt_ids, new_tokens, args.temperature, args.top_p, args.seed, printer, timing,
                   n_valid=tokenizer.vocab_size)
    sys.stdout.write("\n")
    for note in printer.notes():
      print(f"note: {note}", file=sys.stderr)
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
  runtime.inference_memory()
  runtime.cache_compilations()
  runtime.reuse_step_memory()  # every forward pass reuses its temporaries' memory (README: Benchmarks)
  sys.exit(main())
