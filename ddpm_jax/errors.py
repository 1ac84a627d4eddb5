"""The two exceptions that the command line reports as one line (main.py).

Everything else keeps its traceback: an error that is not one of these is a bug, not bad
input.
"""


class ConfigError(ValueError):
  """Bad user input: a config field or flag, the workdir, or what the workdir or data_dir
  holds (a missing checkpoint, an incompatible run, a locked workdir, absent data).

  The message is one line naming the bad value and what is allowed.
  """


class NonFiniteError(FloatingPointError):
  """A training run produced a non-finite loss, gradient or parameter (nothing is saved)."""
