"""Tokenizers: byte-level (no files), GPT-2 (r50k_base) and o200k_harmony through tiktoken.

tiktoken downloads its vocabularies on first use; with no internet pass a local `.tiktoken` file
(`vocab_file`), or set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache files.
"""

from __future__ import annotations

from typing import Protocol
from unittest import mock

from gptoss_jax.config import ConfigError

TOKENIZERS = ("byte", "gpt2", "o200k_harmony")


class Tokenizer(Protocol):
  name: str
  vocab_size: int
  eot_id: int | None  # appended after each document, when the vocabulary has one

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
  name, vocab_size, eot_id = "byte", 256, None

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


class TiktokenTokenizer:

  def __init__(self, name: str, vocab_file: str | None = None):
    import tiktoken
    import tiktoken.load
    import tiktoken_ext.openai_public as openai_public
    constructor = {"gpt2": openai_public.r50k_base, "o200k_harmony": openai_public.o200k_harmony}[name]
    try:
      if vocab_file:
        ranks = tiktoken.load.load_tiktoken_bpe(vocab_file)
        with mock.patch.object(openai_public, "load_tiktoken_bpe", lambda *a, **k: ranks):
          spec = constructor()
      else:
        spec = constructor()
    except Exception as e:  # no internet, no cache, unreadable file
      raise ConfigError(f"cannot load the {name} vocabulary ({type(e).__name__}: {str(e)[:200]}); pass a local "
                        f".tiktoken file with --config.data.vocab_file=PATH") from None
    spec.pop("explicit_n_vocab", None)
    self.encoding = tiktoken.Encoding(**spec)
    self.name = name
    self.vocab_size = self.encoding.n_vocab
    self.eot_id = self.encoding.eot_token

  def encode(self, text: str) -> list[int]:
    return self.encoding.encode_ordinary(text)

  def decode(self, ids: list[int]) -> str:
    return self.encoding.decode(ids)


def get_tokenizer(name: str, vocab_file: str | None = None) -> Tokenizer:
  if name == "byte":
    return ByteTokenizer()
  if name in TOKENIZERS:
    return TiktokenTokenizer(name, vocab_file or None)
  raise ConfigError(f"data.tokenizer must be one of {'|'.join(TOKENIZERS)}, got {name!r}")
