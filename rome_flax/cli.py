"""What every entry point shares: an argument parser whose mistakes are one `error:` line, and the
one error wrapper that turns a `RomeFlaxError` into `error: ...` on stderr and exit code 2.

Exit codes: 0 done; 2 bad input or a failed file operation (`error: ...`: a full disk, a file size
limit, a read-only disk, a missing permission, a name too long); 3 training stopped by SIGTERM /
SIGINT after saving a checkpoint (`--resume` continues; see preemption.py); 130 / 143 interrupted by
SIGINT / SIGTERM outside training (nothing to save; nothing partial is left). `--debug` adds the
Python traceback to an error line. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Callable, Optional, Sequence

from rome_flax import runtime
from rome_flax.errors import RomeFlaxError, io_error_in, os_error_text
from rome_flax.io.preemption import EXIT_PREEMPTED, Interrupted, Preempted, interrupt_on_signals

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130   # the shell's code for SIGINT


class _DefaultsFormatter(argparse.HelpFormatter):
  """Every option's help ends with its default, unless it has none or the help already says it."""

  def _get_help_string(self, action):
    text = action.help or ""
    if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings or "default" in text.lower():
      return text
    return f"{text} (default: {action.default})".lstrip()


class ArgumentParser(argparse.ArgumentParser):
  """argparse with `error: ...` on one line and exit code 2 (no usage dump), `--debug`,
  `--compilation_cache` (applied by `run`) and every option's default in `--help`."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("allow_abbrev", False)
    kwargs.setdefault("formatter_class", _DefaultsFormatter)
    super().__init__(*args, **kwargs)
    self.add_argument("--debug", action="store_true", help="show the Python traceback of an error too")
    self.add_argument("--compilation_cache", metavar="DIR", default=None,
                      help="keep XLA's compiled programs in DIR (a folder per CPU type) and reuse them on the next "
                      "start (a TOKEE server's warm-up 83 -> 20 s, an SST-2 server's 28 -> 9 s); 'off': compile every time (default: "
                      f"${runtime.ENV_CACHE}, else $JAX_COMPILATION_CACHE_DIR, else ~/.cache/rome_flax/xla or "
                      "$XDG_CACHE_HOME/rome_flax/xla)")

  def error(self, message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def run(program: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
        argv: Optional[Sequence[str]] = None) -> int:
  """Parses argv, runs `program(args)`; a RomeFlaxError becomes one `error:` line and exit code 2,
  a training run stopped by a signal one `stopped:` line and exit code 3. XLA's compilation cache is set
  up first (`runtime.compilation_cache`)."""
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  args = parser.parse_args(argv)
  debug = getattr(args, "debug", False)
  try:
    with interrupt_on_signals():
      if hasattr(args, "compilation_cache"):
        runtime.compilation_cache(args.compilation_cache)
      program(args)
  except RomeFlaxError as e:
    if debug:
      traceback.print_exc()
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USER_ERROR
  except Preempted as e:
    print(f"stopped: {e}", file=sys.stderr)
    return EXIT_PREEMPTED
  except KeyboardInterrupt as e:
    if debug:
      traceback.print_exc()
    print(f"interrupted by {e}" if isinstance(e, Interrupted) else "interrupted", file=sys.stderr)
    return e.exit_code if isinstance(e, Interrupted) else EXIT_INTERRUPTED
  except Exception as e:
    failed = io_error_in(e)
    if failed is None:
      raise
    if debug:
      traceback.print_exc()
    print(f"error: {os_error_text(failed)}", file=sys.stderr)
    return EXIT_USER_ERROR
  return 0
