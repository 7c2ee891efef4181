"""python -m gptoss_jax.train --config <file>[:<preset>] --workdir DIR [--config.a.b=value ...]

Trains, or resumes from the newest checkpoint in DIR. Bad input: one line on stderr, exit status 2.
"""

import argparse
import json
import sys

from gptoss_jax.config import ConfigError

from gptoss_jax.config_files import run_config_from_args

DEFAULT_CONFIG = "gpt_oss:tiny"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gptoss_jax.train", description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=DEFAULT_CONFIG,
                      help="a preset file by name (gpt_oss:tiny), a path (configs/gpt_oss.py:tiny), or a saved run "
                           "config (run.json)")
  parser.add_argument("--workdir", required=True, help="checkpoints, TensorBoard logs, metrics.jsonl")
  args, rest = parser.parse_known_args(argv)
  try:
    config = run_config_from_args(args.config, rest)  # the one place a run becomes typed
    from gptoss_jax.train.loop import TrainingError, train, validate
    validate(config)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(config.to_dict(), indent=1))
  try:
    metrics = train(config, args.workdir)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except TrainingError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  summary = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("train/loss", "eval/loss") if k in metrics)
  print(f"done: {summary}. Loss curve: {args.workdir}/loss.png; TensorBoard: tensorboard --logdir {args.workdir}/tb")
  return 0


if __name__ == "__main__":
  from gptoss_jax import runtime
  runtime.configure()  # before JAX starts its backend
  runtime.reuse_step_memory()
  sys.exit(main())
