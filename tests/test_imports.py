"""What importing the package does to a process: nothing."""

import subprocess
import sys

from conftest import REPO


def test_importing_the_package_leaves_the_environment_alone():
  probe = ("import os; before = dict(os.environ)\n"
           "import gptoss_jax, gptoss_jax.train.loop, gptoss_jax.convert.hf, gptoss_jax.generate, gptoss_jax.evaluate\n"
           "import gptoss_jax.data.tokenizers, jax\n"
           "print(dict(os.environ) == before, jax.config.read('jax_cpu_enable_async_dispatch'))")
  out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["True", "True"], out.stdout


def test_conversion_evaluation_and_generation_need_nothing_from_training():
  probe = ("import sys\n"
           "import gptoss_jax, gptoss_jax.convert.__main__, gptoss_jax.convert.export, gptoss_jax.evaluate\n"
           "import gptoss_jax.generate, gptoss_jax.weights\n"
           "print(sorted(m for m in sys.modules if m.startswith('gptoss_jax.train')))")
  out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout
