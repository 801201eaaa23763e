"""One exception type for user-facing errors.

Entry points catch `RomeFlaxError`, print its message as one line and exit non-zero; anything
else is a bug and keeps its traceback.
"""


class RomeFlaxError(Exception):
  """A problem with the user's input (path, file, option, checkpoint), not a bug."""
