"""What importing the package does to a process (nothing), and what conversion, evaluation and generation
import (nothing from training)."""

import subprocess
import sys

from conftest import REPO


def _fresh_interpreter(code: str) -> str:
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout


def test_importing_the_package_leaves_the_environment_alone():
  out = _fresh_interpreter(
      "import os; before = dict(os.environ)\n"
      "import gptoss_jax, gptoss_jax.train.loop, gptoss_jax.convert.hf, gptoss_jax.generate, gptoss_jax.evaluate\n"
      "import gptoss_jax.data.tokenizers, jax\n"
      "print(dict(os.environ) == before, jax.config.read('jax_cpu_enable_async_dispatch'))")
  assert out.split() == ["True", "True"], out


def test_the_harness_is_imported_only_by_its_own_module():
  """lm-eval (and torch, which it imports) stay out of a process that uses the package's commands, until
  gptoss_jax.lm_eval.model is imported, which registers the model under the harness's name."""
  out = _fresh_interpreter(
      "import sys\n"
      "import gptoss_jax, gptoss_jax.lm_eval, gptoss_jax.evaluate, gptoss_jax.generate, gptoss_jax.train.loop\n"
      "import gptoss_jax.convert.__main__, gptoss_jax.weights\n"
      "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lm_eval', 'torch')))\n"
      "import gptoss_jax.lm_eval.model\n"
      "from lm_eval.api.registry import get_model\n"
      "print(get_model('gptoss_jax').__name__)")
  assert out.split("\n")[:2] == ["[]", "HarnessModel"], out


def test_conversion_evaluation_and_generation_need_nothing_from_training():
  out = _fresh_interpreter(
      "import sys\n"
      "import gptoss_jax, gptoss_jax.convert.__main__, gptoss_jax.convert.export, gptoss_jax.evaluate\n"
      "import gptoss_jax.generate, gptoss_jax.weights\n"
      "print(sorted(m for m in sys.modules if m.startswith('gptoss_jax.train')))")
  assert out.strip() == "[]", out


def test_the_typed_config_imports_nothing_else_and_loading_it_needs_no_jax():
  """gptoss_jax.config is the typed configs only (no ml_collections, no package module); config_files, the
  only module that knows ml_collections, and the data modules import no model code (nor flax)."""
  out = _fresh_interpreter(
      "import sys\n"
      "import gptoss_jax.config\n"
      "print(sorted(m for m in sys.modules if m.startswith(('gptoss_jax.', 'ml_collections', 'jax', 'configs'))))\n"
      "import gptoss_jax.config_files, gptoss_jax.data.prepare, gptoss_jax.data.pipeline\n"
      "print('gptoss_jax.model' in sys.modules, 'flax' in sys.modules)")
  typed, heavy = out.strip().splitlines()
  assert typed == "['gptoss_jax.config']" and heavy == "False False", out


def test_the_readmes_layout_names_every_module():
  from pathlib import Path
  readme = (Path(REPO) / "README.md").read_text()
  layout = readme[readme.index("## Layout"):readme.index("## Benchmarks")]
  modules = [p for d in ("gptoss_jax", "experiments") for p in (Path(REPO) / d).rglob("*.py")
             if p.name not in ("__init__.py", "__main__.py")]
  missing = [str(p.relative_to(REPO)) for p in modules if p.name not in layout]
  assert not missing, f"README's Layout does not name: {missing}"


def test_no_function_is_over_60_lines():
  import ast
  from pathlib import Path
  long = []
  for path in [p for d in ("gptoss_jax", "experiments") for p in (Path(REPO) / d).rglob("*.py")]:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
  assert not long, long
