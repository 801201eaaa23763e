"""One exception type for user-facing errors (and its serving request's case), and the words for a failed
file operation.

Entry points catch `RomeFlaxError`, print its message as one line and exit non-zero; anything
else is a bug and keeps its traceback. A full disk, a file size limit, a read-only or failing
disk, a missing permission or a name too long for the file system (`IO_ERRNOS`) is not a bug
either: `cli.run` gives it one `error:` line too.
"""

import errno
import os


class RomeFlaxError(Exception):
  """A problem with the user's input (path, file, option, checkpoint), not a bug."""


class RequestError(RomeFlaxError):
  """A serving request itself is wrong (HTTP 400): empty text, over-long input, unknown policy, a payload
  its model's kind does not take. Here, not in engine/serving.py: the task kind checks the payload."""


IO_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.EROFS,
                       errno.EIO, errno.EDQUOT, errno.EMFILE, errno.ENFILE})


def os_error_text(e: OSError) -> str:
  """'PATH: No space left on device' (the errno's words; the path when the error names one)."""
  words = e.strerror or str(e)
  return f"{e.filename}: {words}" if e.filename else words


def io_error_in(e: BaseException) -> "OSError | None":
  """The OSError of IO_ERRNOS behind an exception (itself, or its cause / context: Orbax and other
  libraries wrap the failed write in their own exception types; TensorStore's C++ errors carry only
  the errno's words in their message), else None."""
  seen, chain = set(), []
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in IO_ERRNOS:
      return e
    chain.append(e)
    e = e.__cause__ or e.__context__
  for code in sorted(IO_ERRNOS):
    words = os.strerror(code)
    for wrapped in chain:
      message = str(wrapped)
      if words in message:
        return OSError(code, f"{words} ({type(wrapped).__name__}: {message.splitlines()[0][:300]})")
  return None
