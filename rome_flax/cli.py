"""What every entry point shares: an argument parser whose mistakes are one `error:` line, and the
one error wrapper that turns a `RomeFlaxError` into `error: ...` on stderr and exit code 2.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional, Sequence

from rome_flax.errors import RomeFlaxError

EXIT_USER_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
  """argparse with `error: ...` on one line and exit code 2 (no usage dump)."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("allow_abbrev", False)
    super().__init__(*args, **kwargs)

  def error(self, message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def run(program: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
        argv: Optional[Sequence[str]] = None) -> int:
  """Parses argv, runs `program(args)`; a RomeFlaxError becomes one `error:` line and exit code 2."""
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  args = parser.parse_args(argv)
  try:
    program(args)
  except RomeFlaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USER_ERROR
  return 0
