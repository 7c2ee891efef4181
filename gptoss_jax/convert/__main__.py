"""python -m gptoss_jax.convert --src HF_FOLDER --dst CHECKPOINT_DIR [--dtype bfloat16|float32] [--keep-mxfp4]
python -m gptoss_jax.convert --to-hf --src CHECKPOINT_DIR --dst HF_FOLDER [--family gpt2|gpt_oss|...]

Hugging Face folder (gpt2, gpt_oss incl. MXFP4, qwen3, qwen3_moe, llama; one or several safetensors
files) -> a checkpoint that evaluation and generation load, and with --to-hf the way back (a training
run or a conversion -> a folder transformers loads). Streams tensor by tensor; leaves nothing at --dst
on failure. Bad input: one line on stderr, exit status 2.
"""

import argparse
import sys
from pathlib import Path

from gptoss_jax.config import ConfigError

# the tokenizer each family's released checkpoints use, where tiktoken has it (a folder exported from here
# names its own)
TOKENIZERS = {"gpt2": "gpt2", "gpt_oss": "o200k_harmony"}


# the window `evaluate` uses on a conversion unless --seq-len says otherwise: the model's context, up to the
# 4,096 tokens gpt-oss was pre-trained at before YaRN stretched it to 131,072 (longer windows cost attention
# time and memory growing with their square)
EVAL_CONTEXT = 4096


def convert(src: str, dst: str, dtype: str = "bfloat16", keep_mxfp4: bool = False, progress: bool = True):
  """Each tensor converted and written as it is read (weights.weights_writer): the whole model is never in
  memory."""
  from gptoss_jax.convert.export import TOKENIZER_KEY
  from gptoss_jax.convert.hf import read_hf_config, read_weights
  from gptoss_jax.weights import weights_writer
  from gptoss_jax.config import DataConfig, RunConfig
  hf = read_hf_config(src)
  cfg, arrays = read_weights(src, dtype=dtype, keep_mxfp4=keep_mxfp4)  # checks the folder before writing
  tokenizer = hf.get(TOKENIZER_KEY) or TOKENIZERS.get(hf["model_type"], "byte")
  config = RunConfig(model=cfg, data=DataConfig(tokenizer=tokenizer, seq_len=min(EVAL_CONTEXT, cfg.max_seq_len)))
  bar = None  # created at the first tensor, so that input rejected up front prints one line only
  try:
    with weights_writer(dst, config, {"source": str(src), "model_type": hf["model_type"]}) as add:
      for name, array in arrays:
        if progress and bar is None:
          from tqdm import tqdm
          bar = tqdm(desc="converting", unit="tensor", file=sys.stderr)
        add(name, array)
        if bar is not None:
          bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  return Path(dst).absolute()


def vocabulary(data):
  """The run's tokenizer with its vocabulary, if it can be had offline (else None, with a note)."""
  from gptoss_jax.data.tokenizers import get_tokenizer
  try:
    return get_tokenizer(data.tokenizer, data.vocab_file)
  except ConfigError as e:
    print(f"note: no tokenizer.json written ({e})", file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gptoss_jax.convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("--src", required=True, help="Hugging Face model folder")
  parser.add_argument("--dst", required=True, help="checkpoint folder to create")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--keep-mxfp4", action="store_true", help="keep MXFP4 experts packed (gpt_oss)")
  parser.add_argument("--to-hf", action="store_true", help="export a checkpoint as a Hugging Face folder")
  parser.add_argument("--family", default=None, choices=("gpt2", "gpt_oss", "qwen3", "qwen3_moe", "llama"),
                      help="with --to-hf: the model type to write (default: inferred from the architecture)")
  args = parser.parse_args(argv)
  from gptoss_jax.convert.hf import CheckpointError
  try:
    if args.to_hf:
      from gptoss_jax.convert.export import export_hf
      from gptoss_jax.weights import load_model
      config, _, model = load_model(args.src)
      out = export_hf(model, args.dst, args.family, config.data.tokenizer, vocabulary(config.data))
    else:
      out = convert(args.src, args.dst, args.dtype, args.keep_mxfp4)
  except (ConfigError, CheckpointError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  from gptoss_jax import runtime
  runtime.configure()  # before JAX starts its backend
  sys.exit(main())
