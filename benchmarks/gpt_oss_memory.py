"""Peak host memory of every phase of running gpt-oss-20b's shape on the CPU (random weights of the real widths,
experts packed as MXFP4), as the commands run it; optionally side by side with another checkout's code.

  python benchmarks/gpt_oss_memory.py [--layers 24] [--code . /path/to/older/checkout] [--workdir DIR]

Builds a Hugging Face folder in the hub's MXFP4 layout once and converts it with the first checkout's
`convert --keep-mxfp4` (the whole command's peak); then for each checkout (its code on PYTHONPATH), in fresh
processes: load + generate (a greedy reply of --new tokens to a --prompt-token prompt, as `generate` runs
it: runtime settings, step-memory reuse); load + evaluate (--eval-windows windows of --seq-len tokens,
--batch at a time, as `evaluate` runs it). Within a
process the peak is reset between phases (Linux), so a phase's figure is what stayed resident plus its
own high-water mark: load; prefill (its compilations included); decode; evaluate (compilation included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from mxfp4_memory import build_folder  # noqa: E402

GIB = 2**30
# in the child: the peak RSS reset to the current RSS between phases (Linux), nothing else done: the figures are
# what the command itself goes through (generate and evaluate keep freed memory, runtime.reuse_step_memory)
CHILD = '''
import json, sys, time
import numpy as np
def peak():
  return [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
def reset():
  open("/proc/self/clear_refs", "w").write("5")
out = {}
from gptoss_jax import runtime
runtime.configure(); runtime.reuse_step_memory()
from gptoss_jax.weights import load_model
reset(); began = time.perf_counter()
_, cfg, model = load_model(sys.argv[2])
out["load"], out["load_s"] = peak(), time.perf_counter() - began
reset()
rng = np.random.default_rng(1)
if sys.argv[1] == "generate":
  from gptoss_jax.generate import generate
  def first(token):
    if "prefill" not in out:
      out["prefill"] = peak(); reset()
  timing = {}
  new = generate(model, rng.integers(0, cfg.vocab_size, int(sys.argv[3])).tolist(), int(sys.argv[4]),
                 on_token=first, timing=timing)
  out["decode"] = peak()
  out["prefill_tokens_per_s"] = int(sys.argv[3]) / timing["prefill_s"]
  out["decode_tokens_per_s"] = (len(new) - 1) / timing["decode_s"]
else:
  from gptoss_jax.evaluate import evaluate_tokens
  seq_len, batch, windows = map(int, sys.argv[3:6])
  began = time.perf_counter()
  result = evaluate_tokens(model, rng.integers(0, cfg.vocab_size, seq_len * windows + 1), seq_len, batch,
                           np.ones(cfg.vocab_size, np.int64), progress=False)
  out["evaluate"], out["evaluate_tokens_per_s"] = peak(), result["tokens"] / (time.perf_counter() - began)
print("RESULT", json.dumps(out))
'''


def child(code: Path, *args: str) -> dict:
  env = os.environ | {"PYTHONPATH": str(code)}
  out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, cwd=code)
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(out.stdout.split("RESULT", 1)[1])


def command_peak(code: Path, *args: str) -> int:
  """The peak RSS (bytes) of a whole command, as its own process."""
  wrapper = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); " \
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
  out = subprocess.run([sys.executable, "-c", wrapper, sys.executable, *args], capture_output=True, text=True,
                       env=os.environ | {"PYTHONPATH": str(code)}, cwd=code)
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return int(out.stdout.split()[-1])


def measure(code: Path, ckpt: Path, args) -> dict:
  row = child(code, "generate", str(ckpt), str(args.prompt), str(args.new))
  evaluated = child(code, "evaluate", str(ckpt), str(args.seq_len), str(args.batch), str(args.eval_windows))
  return row | {"load_for_evaluate": evaluated["load"], "evaluate": evaluated["evaluate"],
                "evaluate_tokens_per_s": evaluated["evaluate_tokens_per_s"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, default=24)
  parser.add_argument("--code", nargs="+", default=[str(Path(__file__).parent.parent)],
                      help="checkouts whose code to measure, side by side")
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--new", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=512)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--eval-windows", type=int, default=2)
  parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gpt_oss_memory"))
  args = parser.parse_args()
  workdir = Path(args.workdir)
  hf = workdir / f"hf-{args.layers}"
  if not (hf / "config.json").is_file():
    shutil.rmtree(hf, ignore_errors=True)
    build_folder(hf, args.layers)
  codes = [Path(c).absolute() for c in args.code]
  ckpt = workdir / "converted"
  shutil.rmtree(ckpt, ignore_errors=True)
  converted = command_peak(codes[0], "-m", "gptoss_jax.convert", "--src", str(hf), "--dst", str(ckpt), "--keep-mxfp4")
  print(f"gpt-oss-20b's widths, {args.layers} layers, experts packed; peak RSS, GiB: convert --keep-mxfp4 "
        f"{converted / GIB:.2f} ({codes[0]}); per phase (prefill and evaluate include their compilation), prompt "
        f"{args.prompt} tokens, {args.new} new; evaluate {args.eval_windows} x {args.seq_len} tokens, batch "
        f"{args.batch}", flush=True)
  print(f"{'load':>6} {'prefill':>8} {'decode':>7} {'load':>6} {'evaluate':>9} | {'load s':>6} "
        f"{'prefill t/s':>11} {'decode t/s':>10} {'eval t/s':>8}  code", flush=True)
  for code in codes:
    r = measure(code, ckpt, args)
    print(f"{r['load'] / GIB:6.2f} {r['prefill'] / GIB:8.2f} {r['decode'] / GIB:7.2f} "
          f"{r['load_for_evaluate'] / GIB:6.2f} {r['evaluate'] / GIB:9.2f} | {r['load_s']:6.1f} "
          f"{r['prefill_tokens_per_s']:11.1f} {r['decode_tokens_per_s']:10.2f} {r['evaluate_tokens_per_s']:8.1f}  "
          f"{code}", flush=True)
  shutil.rmtree(ckpt)


if __name__ == "__main__":
  main()
