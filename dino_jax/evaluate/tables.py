"""The plain text tables the evaluations print: one column per model, one row per figure."""
from __future__ import annotations

from typing import Sequence


def text_table(columns: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]],
               label_width: int | None = None) -> str:
  """A header of the column names (underscores shown as spaces), then each row's label padded to
  label_width (default: the longest label) and its cells, each right-aligned in 12 characters
  after two spaces. Cells come formatted (f'{x:.2f}', ...)."""
  width = max(len(label) for label, _ in rows) if label_width is None else label_width
  lines = [" " * width + "".join(f"  {c.replace('_', ' '):>12}" for c in columns)]
  lines += [label.ljust(width) + "".join(f"  {v:>12}" for v in cells) for label, cells in rows]
  return "\n".join(lines)
