"""Page faults per call of a jitted function with a 64 MB temporary, with and without
`gptoss_jax.runtime.reuse_step_memory()` (each in a fresh process). The counts depend on the kernel,
transparent huge pages and glibc, so they are measured here and never asserted in tests.

  python benchmarks/step_memory.py [--calls 5]
"""

import argparse
import subprocess
import sys

WORKER = """
import resource, sys
from gptoss_jax.runtime import reuse_step_memory
applied = reuse_step_memory() if sys.argv[1] == "reuse" else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) @ x))  # a 64 MB temporary per call
x = jnp.ones((4096, 256))
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(sys.argv[2])):
  f(x).block_until_ready()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / int(sys.argv[2]))
"""


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--calls", type=int, default=5)
  args = parser.parse_args()
  print(f"minor page faults per call of a function with a 64 MB temporary ({args.calls} calls after the first)")
  for mode in ("plain", "reuse"):
    out = subprocess.run([sys.executable, "-c", WORKER, mode, str(args.calls)], capture_output=True, text=True,
                         check=True, env={"JAX_PLATFORMS": "cpu", **__import__("os").environ}).stdout.split()
    print(f"{mode:>6}: {float(out[-1]):>10,.0f}   (reuse_step_memory applied: {out[0]})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
