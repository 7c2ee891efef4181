"""Tokenizers: byte-level (no files), GPT-2 (r50k_base) and o200k_harmony through tiktoken.

tiktoken downloads its vocabularies on first use. With no internet: pass a local `.tiktoken` file
(`vocab_file`), or `vocab_file="pypi"` to take the file from a package on PyPI that ships it
(r50k_base in the openai-whisper sdist, o200k_base in the litellm wheel; both MIT), downloaded once
with pip into the cache and never installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import tarfile
import zipfile
from pathlib import Path
from typing import Protocol

from gptoss_jax.config import TOKENIZERS, ConfigError



class Tokenizer(Protocol):
  name: str
  vocab_size: int
  eot_id: int | None  # appended after each document, when the vocabulary has one

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: list[int]) -> str: ...

  def bpe(self) -> tuple[dict[bytes, int], str, dict[str, int]]:
    """As byte-level BPE: mergeable ranks, the split pattern ("" for none) and the special tokens."""
    ...


class ByteTokenizer:
  name, vocab_size, eot_id = "byte", 256, None

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")

  def bpe(self) -> tuple[dict[bytes, int], str, dict[str, int]]:
    return {bytes([b]): b for b in range(256)}, "", {}


class TiktokenTokenizer:

  def __init__(self, name: str, vocab_file: str | None = None):
    import tiktoken
    import tiktoken_ext.openai_public as openai_public
    constructor = {"gpt2": openai_public.r50k_base, "o200k_harmony": openai_public.o200k_harmony}[name]
    try:
      if vocab_file == "pypi":
        vocab_file = str(registry_vocab(name))
      if vocab_file:
        into_tiktoken_cache(name, Path(vocab_file))
      spec = constructor()  # reads tiktoken's cache, checking the file's hash; downloads if it is not there
    except ConfigError:
      raise
    except Exception as e:  # no internet, no cache, unreadable file
      raise ConfigError(f"cannot load the {name} vocabulary ({type(e).__name__}: {str(e)[:200]}); pass a local "
                        f".tiktoken file, or 'pypi', as the vocab file (--config.data.vocab_file=...)") from None
    spec.pop("explicit_n_vocab", None)
    self.spec = spec
    self.encoding = tiktoken.Encoding(**spec)
    self.name = name
    self.vocab_size = self.encoding.n_vocab
    self.eot_id = self.encoding.eot_token

  def encode(self, text: str) -> list[int]:
    return self.encoding.encode_ordinary(text)

  def decode(self, ids: list[int]) -> str:
    return self.encoding.decode(ids)

  def bpe(self) -> tuple[dict[bytes, int], str, dict[str, int]]:
    return self.spec["mergeable_ranks"], self.spec["pat_str"], self.spec["special_tokens"]


# the address tiktoken downloads each vocabulary from; its cache names the file by the address's sha1
VOCAB_URLS = {"gpt2": "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
              "o200k_harmony": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"}


def into_tiktoken_cache(name: str, vocab_file: Path) -> None:
  """Puts a local .tiktoken file where tiktoken's own loader looks first (its cache), so the encoding is
  built by tiktoken itself, which also checks the file's hash; nothing else in the process changes."""
  cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR",
                                                               os.path.join(tempfile.gettempdir(), "data-gym-cache")))
  if not cache:
    raise ConfigError("tiktoken's cache is switched off (TIKTOKEN_CACHE_DIR is empty): a vocab file cannot be used")
  target = Path(cache) / hashlib.sha1(VOCAB_URLS[name].encode()).hexdigest()
  if not target.is_file() or target.read_bytes() != vocab_file.read_bytes():
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    shutil.copyfile(vocab_file, tmp)
    os.replace(tmp, target)


def get_tokenizer(name: str, vocab_file: str | None = None) -> Tokenizer:
  if name == "byte":
    return ByteTokenizer()
  if name in TOKENIZERS:
    return TiktokenTokenizer(name, vocab_file or None)
  raise ConfigError(f"data.tokenizer must be one of {'|'.join(TOKENIZERS)}, got {name!r}")


# tokenizer -> (pip requirement, pip options, member of the archive that is the .tiktoken file)
REGISTRY_VOCABS = {
    "gpt2": ("openai-whisper==20250625", ["--no-binary", ":all:"], "whisper/assets/gpt2.tiktoken"),
    "o200k_harmony": ("litellm==1.109.1", ["--only-binary", ":all:"],
                      "litellm/litellm_core_utils/tokenizers/fb374d419588a4632f3f557e76b4b70aebbca790"),
}


def registry_vocab(name: str) -> Path:
  """The .tiktoken file for `name`, extracted from a package downloaded (not installed) from PyPI."""
  from gptoss_jax.data.sources import pip_download
  from gptoss_jax.fileio import cache_dir
  requirement, options, member = REGISTRY_VOCABS[name]
  out = cache_dir() / "vocab" / f"{name}.tiktoken"
  if out.is_file():
    return out
  archive = pip_download(requirement, options, cache_dir() / "vocab" / "downloads")
  if archive.suffix == ".whl":
    with zipfile.ZipFile(archive) as z:
      data = z.read(member)
  else:
    with tarfile.open(archive) as tar:
      data = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(member))).read()
  tmp = out.with_suffix(f".{os.getpid()}.tmp")  # one per process: others may be writing the same file
  tmp.write_bytes(data)
  os.replace(tmp, out)
  return out
