"""The harness's model: a checkpoint folder (a training run or a conversion, MXFP4 experts included) answering
lm-evaluation-harness's three requests with the harness's own conventions (lm_eval.api.model.TemplateLM):

- loglikelihood(context, continuation): the continuation's log-probability and whether greedy decoding gives
  it; an empty context is the prefix token, spaces at the context's end move to the continuation, and an
  input longer than the model's length is cut from the left (TemplateLM and the `hf` model's rules);
- loglikelihood_rolling(text): the whole text's log-likelihood over windows of the model's length, each
  token scored once, windows made by the harness's own get_rolling_token_windows;
- generate_until(context, gen_kwargs): greedy or sampled tokens through the KV-cache decoding `generate`
  uses, until a stop sequence or max_gen_toks, cut at the first stop sequence as the harness does.

Scoring runs in batches of `batch_size` rows padded to a bucket length (powers of two up to the model's
length): however many lengths a benchmark's requests have, a handful of programs compile. With several
devices, the rows of a batch are split over them (the weights copied to each).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from gptoss_jax import harmony
from gptoss_jax.config import ConfigError
from gptoss_jax.model.platform import target
from gptoss_jax.model.transformer import unembed_scores

SMALLEST_BUCKET = 16


def task_manager(names: list[str], include_path: str = ""):
  """The harness's TaskManager for tasks `names`: the include_path's own tasks alone where they hold every name
  (indexing the harness's 14,683 tasks takes 8 s), else those and the harness's."""
  from lm_eval.tasks import TaskManager
  if include_path:
    local = TaskManager(include_path=include_path, include_defaults=False)
    if names and all(name in local.all_tasks for name in names):
      return local
  return TaskManager(include_path=include_path or None)


def buckets(max_length: int) -> list[int]:
  """The padded lengths inputs are rounded up to: powers of two from SMALLEST_BUCKET, and max_length."""
  out = [SMALLEST_BUCKET]
  while out[-1] < max_length:
    out.append(out[-1] * 2)
  return [b for b in out if b < max_length] + [max_length]


def bucket(n: int, max_length: int) -> int:
  return next(b for b in buckets(max_length) if b >= n)


@register_model("gptoss_jax")
class HarnessModel(TemplateLM):
  """model_args: ckpt (the folder), step, batch_size, max_length (default the model's max_seq_len, at most
  4,096), prefix_token_id (default the tokenizer's end of text, else 0), vocab_file, seed (sampling), and
  model fields that keep every weight's shape (`model.position=yarn`, ...) as at evaluation."""

  def __init__(self, ckpt: str, step: int | None = None, batch_size: int | str = 8, max_length: int = 0,
               prefix_token_id: int | None = None, vocab_file: str = "", seed: int = 0,
               device=None, max_batch_size=None, **overrides):  # device, max_batch_size: the harness's, unused
    super().__init__()
    from gptoss_jax.data.tokenizers import get_tokenizer
    from gptoss_jax.weights import load_model
    unknown = [k for k in overrides if not k.startswith("model.")]
    if unknown:
      raise ConfigError(f"unknown model argument(s) {', '.join(unknown)} (ckpt, step, batch_size, max_length, "
                        "prefix_token_id, vocab_file, seed, or model.FIELD=VALUE)")
    config, self.cfg, model = load_model(ckpt, None if step in (None, "") else int(step),
                                         {k: str(v) for k, v in overrides.items()} or None)
    self.model = model
    self.tokenizer_ = get_tokenizer(config.data.tokenizer, vocab_file or config.data.vocab_file)
    self.max_length = int(max_length) or min(self.cfg.max_seq_len, 4096)
    if self.max_length > self.cfg.max_seq_len:
      raise ConfigError(f"max_length {self.max_length} is past the model's max_seq_len {self.cfg.max_seq_len}")
    self._prefix = int(prefix_token_id) if prefix_token_id not in (None, "") else (
        self.tokenizer_.eot_id if self.tokenizer_.eot_id is not None else 0)
    self.seed = int(seed)
    self.mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = 8 if batch_size in ("auto", None, "") else int(str(batch_size).split(":")[0])
    self.batch_size = -(-rows // self.mesh.size) * self.mesh.size  # whole rows on every device
    self._graphdef, state = nnx.split(model)
    # one device: the weights as loaded (a copy would double gpt-oss-20b's 13 GiB); several: one copy on each
    self._state = state if self.mesh.size == 1 else jax.device_put(state, NamedSharding(self.mesh, P()))
    self._rows = NamedSharding(self.mesh, P("data"))
    self._score = jax.jit(self._scores)

  # what the harness asks of a TemplateLM
  @property
  def eot_token_id(self) -> int:
    return self._prefix if self.tokenizer_.eot_id is None else self.tokenizer_.eot_id

  @property
  def prefix_token_id(self) -> int:
    return self._prefix

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer_.name

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    return self.tokenizer_.encode(string)

  def tok_decode(self, tokens: list[int]) -> str:
    return self.tokenizer_.decode(list(tokens))

  def chat_template(self, chat_template: bool | str = False) -> str:
    return "harmony" if self.tokenizer_.name == "o200k_harmony" else "plain"

  def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """gpt-oss's harmony format for an o200k_harmony checkpoint; other families' turns as plain text."""
    if self.tokenizer_.name == "o200k_harmony":
      return harmony.conversation(chat_history)
    return "\n\n".join(m["content"] for m in chat_history)

  # scoring
  def _scores(self, state, tokens_BxT, targets_BxT):
    model = nnx.merge(self._graphdef, state)
    x_BxTxD, _, _ = model.trunk(tokens_BxT)
    nll_BxT, greedy_BxT = unembed_scores(x_BxTxD, model.unembedding(), targets_BxT, target(model.cfg))
    return -nll_BxT, greedy_BxT

  def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(context tokens, continuation tokens) -> (the continuation's log-probability, whether it is the greedy
    one), the input cut from the left at max_length; batched by bucket length, longest first."""
    rows = []
    for context, continuation in pairs:
      if not continuation or not context:
        raise ValueError("a request needs a context token and a continuation token")
      whole = (context + continuation)[-(self.max_length + 1):]
      rows.append((whole[:-1], whole[1:], min(len(continuation), len(whole) - 1)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      T = bucket(len(rows[chunk[0]][0]), self.max_length)
      tokens, targets = np.zeros((self.batch_size, T), np.int32), np.zeros((self.batch_size, T), np.int32)
      for r, i in enumerate(chunk):
        inp, tgt, _ = rows[i]
        tokens[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
      logp, greedy = jax.device_get(self._score(self._state, jax.device_put(tokens, self._rows),
                                                jax.device_put(targets, self._rows)))
      for r, i in enumerate(chunk):
        n, k = len(rows[i][0]), rows[i][2]
        out[i] = (float(np.sum(logp[r, n - k:n], dtype=np.float64)), bool(np.all(greedy[r, n - k:n])))
    return out

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    results = self.score_tokens([(context, continuation) for _, context, continuation in requests])
    for (request, _, _), result in zip(requests, results):
      if request is not None:
        self.cache_hook.add_partial("loglikelihood", request, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for i, (text,) in enumerate(req.args for req in requests):
      for window in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
          context_len=1)):
        windows.append(window)
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owner, self.score_tokens(windows)):
      totals[i] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    from gptoss_jax.generate import generate
    eos = self.tok_decode([self.eot_token_id])
    out = []
    for index, req in enumerate(requests):
      context, gen_kwargs = req.args
      kwargs = normalize_gen_kwargs(dict(gen_kwargs), 256)
      until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
      max_new = int(kwargs.pop("max_gen_toks"))
      if max_new >= self.max_length:
        raise ConfigError(f"max_gen_toks {max_new} leaves no room for a context in max_length {self.max_length}")
      prompt = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
      temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
      new: list[int] = []

      def stop(token: int) -> bool:
        new.append(token)
        return any(s and s in self.tok_decode(new) for s in until)

      generate(self.model, prompt, max_new, temperature, float(kwargs.get("top_p", 1.0)), self.seed + index, stop,
               n_valid=self.tokenizer_.vocab_size, cache_len=bucket(len(prompt) + max_new, self.max_length))
      text = postprocess_generated_text(self.tok_decode(new), until, None)
      self.cache_hook.add_partial("generate_until", req.args, text)
      out.append(text)
    return out
