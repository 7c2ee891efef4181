"""A tiktoken vocabulary as a Hugging Face `tokenizer.json` (byte-level BPE), so that transformers
tokenizes an exported model's text exactly as tiktoken does, with no network.

tiktoken stores ranks (token bytes -> id); a Hugging Face BPE needs the merges too. They are recovered
from the ranks: a token of rank r is what byte-pair merging of its own bytes, using only merges of rank
below r, ends in, as two parts; those two parts are its merge.
"""

from __future__ import annotations

import functools


@functools.cache
def byte_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map of the 256 byte values to printable characters (byte-level BPE's alphabet)."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def _split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
  """Byte-pair merging of `token`, lowest rank first, with merges of rank below `max_rank` only."""
  parts = [bytes([b]) for b in token]
  while len(parts) > 1:
    best, best_rank = None, max_rank
    for i in range(len(parts) - 1):
      rank = ranks.get(parts[i] + parts[i + 1])
      if rank is not None and rank < best_rank:
        best, best_rank = i, rank
    if best is None:
      break
    parts[best:best + 2] = [parts[best] + parts[best + 1]]
  return parts


def tokenizer_json(ranks: dict[bytes, int], pat_str: str, special_tokens: dict[str, int]) -> dict:
  """The `tokenizer.json` of a byte-level BPE (tiktoken's mergeable ranks, its split pattern or "" for
  none, special tokens); the byte tokenizer is the one with 256 single-byte tokens and no merges."""
  to_text = lambda b: "".join(byte_to_unicode()[x] for x in b)
  merges = []
  for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
    if len(token) > 1:
      left, right = _split(ranks, token, rank)
      merges.append([to_text(left), to_text(right)])
  added = [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
            "special": True} for text, i in sorted(special_tokens.items(), key=lambda kv: kv[1])]
  return {
      "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
          {"type": "Split", "pattern": {"Regex": pat_str}, "behavior": "Isolated", "invert": False}] * bool(pat_str)
          + [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
      "post_processor": None,
      "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
      "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                "vocab": {to_text(token): rank for token, rank in ranks.items()}, "merges": merges},
  }
