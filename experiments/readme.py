"""The result tables and verdicts of the README and docs/results.md, taken from the committed reports so they
cannot drift.

A block in such a file reads (the path relative to the file)

  <!-- report: experiments/results/ladder-tiny/report.md, table 2 -->
  | ... the report's second table, verbatim ... |
  <!-- end report -->

or, with `verdicts` in place of `table N`, the bullets of the report's `## Verdicts` (experiments/verdicts.py).

`python -m experiments.report --readme README.md docs/results.md` rewrites every block from its report; the
test suite fails when a block differs from its report (tests/test_experiments.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from experiments.verdicts import HEADING

BLOCK = re.compile(r"(<!-- report: (?P<path>\S+), (?P<what>table (?P<n>\d+)|verdicts) -->\n)(?P<body>.*?)"
                   r"(?P<end><!-- end report -->)", re.S)


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


def verdicts(markdown: str) -> str:
  """The bullets of a report's `## Verdicts` section."""
  section = markdown.partition(f"\n{HEADING}\n")[2].partition("\n## ")[0]
  return "".join(line + "\n" for line in section.splitlines() if line.startswith("- "))


def wanted(m: re.Match, root: Path) -> str:
  """What a block should hold: its report's table or verdicts."""
  report = (root / m["path"]).read_text()
  if m["what"] == "verdicts":
    return verdicts(report) or f"(no verdicts in {m['path']})\n"
  found, n = tables(report), int(m["n"])
  return found[n - 1] if 0 < n <= len(found) else f"(no table {n} in {m['path']})\n"


def blocks(readme: str, root: Path) -> list[tuple[str, str, str]]:
  """(where, the README's block, what its report says) for every block."""
  return [(f"{m['path']}, {m['what']}", m["body"], wanted(m, root)) for m in BLOCK.finditer(readme)]


def rewrite(readme_path: Path) -> int:
  """Fills every block from its report; returns how many changed."""
  root, text = readme_path.parent, readme_path.read_text()
  changed = sum(body != want for _, body, want in blocks(text, root))
  readme_path.write_text(BLOCK.sub(lambda m: m.group(1) + wanted(m, root) + m["end"], text))
  return changed
