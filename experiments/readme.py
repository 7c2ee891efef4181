"""The result tables of the README and docs/results.md, taken from the committed reports so they cannot drift.

A block in such a file reads (the path relative to the file)

  <!-- report: experiments/results/ladder-tiny/report.md, table 2 -->
  | ... the report's second table, verbatim ... |
  <!-- end report -->

`python -m experiments.report --readme README.md docs/results.md` rewrites every block from its report; the
test suite fails when a block differs from its report (tests/test_experiments.py).
"""

from __future__ import annotations

import re
from pathlib import Path

BLOCK = re.compile(r"(<!-- report: (?P<path>\S+), table (?P<n>\d+) -->\n)(?P<body>.*?)(<!-- end report -->)", re.S)


def tables(markdown: str) -> list[str]:
  """Every table of a markdown text (consecutive lines starting with '|'), in order."""
  out, current = [], []
  for line in markdown.splitlines() + [""]:
    if line.startswith("|"):
      current.append(line)
    elif current:
      out.append("\n".join(current) + "\n")
      current = []
  return out


def blocks(readme: str, root: Path) -> list[tuple[str, str, str]]:
  """(where, the README's block, the report's table) for every block."""
  out = []
  for m in BLOCK.finditer(readme):
    report = (root / m["path"]).read_text()
    found = tables(report)
    n = int(m["n"])
    want = found[n - 1] if 0 < n <= len(found) else f"(no table {n} in {m['path']})\n"
    out.append((f"{m['path']}, table {n}", m["body"], want))
  return out


def rewrite(readme_path: Path) -> int:
  """Fills every block from its report; returns how many changed."""
  root, text = readme_path.parent, readme_path.read_text()
  changed = sum(body != want for _, body, want in blocks(text, root))

  def fill(m):
    found = tables((root / m["path"]).read_text())
    return m.group(1) + found[int(m["n"]) - 1] + m.group(5)
  readme_path.write_text(BLOCK.sub(fill, text))
  return changed
