"""A one-line progress bar on stderr (no dependency)."""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


class Progress:
  """``[problem] [#####.....] 12/31 cagrad  0:42``, redrawn in place.

  Draws only when ``enabled`` and the stream is a terminal, so logs and
  pipes stay clean.

  Args:
    label: shown first (the problem's name).
    total: number of items.
    enabled: draw at all (``--no-progress`` turns it off).
    stream: where to draw (stderr).
  """

  def __init__(self, label: str, total: int, *, enabled: bool = True, stream: TextIO | None = None):
    self.stream = sys.stderr if stream is None else stream
    self.label, self.total = label, max(total, 1)
    self.enabled = enabled and getattr(self.stream, "isatty", lambda: False)()
    self.start = time.monotonic()
    self.drawn = False

  def update(self, done: int, text: str = "") -> None:
    """Shows ``done`` of ``total`` finished, with ``text`` (what runs now)."""
    if not self.enabled:
      return
    seconds = int(time.monotonic() - self.start)
    width = 20
    filled = width * min(done, self.total) // self.total
    line = (
      f"[{self.label}] [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
      f"{text}  {seconds // 60}:{seconds % 60:02d}"
    )
    columns = shutil.get_terminal_size((80, 20)).columns
    self.stream.write("\r" + line[: columns - 1].ljust(columns - 1))
    self.stream.flush()
    self.drawn = True

  def close(self) -> None:
    """Erases the bar."""
    if self.enabled and self.drawn:
      columns = shutil.get_terminal_size((80, 20)).columns
      self.stream.write("\r" + " " * (columns - 1) + "\r")
      self.stream.flush()
