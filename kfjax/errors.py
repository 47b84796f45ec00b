"""Errors that reach the user as one clear line (the CLI prints them and exits non-zero)."""


class KfjaxError(Exception):
  """A problem with the user's input or flags; its message is shown as-is."""
