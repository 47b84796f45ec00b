"""Errors that reach the user as one clear line (the CLI prints them and exits non-zero)."""

import sys


class KfjaxError(Exception):
  """A problem with the user's input or flags; its message is shown as-is."""


def fail(msg, prog="kfjax"):
  """Print ``<prog>: error: <msg>`` as one line on stderr and exit with status 2."""
  print(f"{prog}: error: {msg}", file=sys.stderr)
  sys.exit(2)


class NotTogether(Exception):
  """Images meant to run as one group cannot (their checkpoints are at different steps,
  or their shapes differ): the caller runs them one at a time instead."""
