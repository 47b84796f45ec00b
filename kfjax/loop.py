"""The host loop shared by Phase 1, Phase 2 and KernelGAN.

Each of them compiles one ``chunk`` program (a ``lax.scan`` over a fixed number of steps)
and calls it until its work is done; between calls the host checks the losses, moves the
progress bar and maybe writes a checkpoint. Only the chunk and those three callbacks
differ, so the loop itself lives here once.
"""

import threading

import numpy as np

from kfjax import ops

_STOP = threading.Event()


class Stopped(Exception):
  """A stop was requested (SIGTERM): the phase checkpointed where it was and returned."""


def request_stop(*_):
  """Ask every running loop to stop after its current chunk (a signal handler)."""
  _STOP.set()


def clear_stop():
  _STOP.clear()


def raise_if_stopped():
  if _STOP.is_set():
    raise Stopped("stopped on request")


def log(msg):
  """One line of progress for a person (the phases' restore/resume messages)."""
  print(f"kfjax: {msg}", flush=True)


def chunk_size(total, wanted):
  """One compiled chunk's length for a loop of ``total`` steps: the largest divisor of
  ``total`` that is <= ``wanted``, so that every chunk runs the same program."""
  return ops.largest_divisor(total, min(wanted, total))


def run_chunks(chunk, state, *, done, total, length, bar, report, after=None, lag=False):
  """Call ``state, out = chunk(state)`` until ``done`` reaches ``total`` (``length`` steps
  per call); returns ``(state, out of the last call)`` (``out`` is None if nothing ran).

  ``report(out, done) -> dict`` turns a call's output into the bar's postfix (and raises
  on a non-finite loss); ``after(state, done, stop)`` runs after every call (checkpoints;
  ``stop`` True when a stop was requested, so it must save now): the loop then raises
  :class:`Stopped`.
  With ``lag`` the output of call ``n`` is reported while call ``n + 1`` runs (reading it
  waits for the device, which would otherwise idle between chunks); the last one is
  reported after the loop.
  """
  out = pending = None
  while done < total:
    state, out = chunk(state)
    done += length
    if not lag:
      bar.set_postfix(**report(out, done), refresh=False)
    elif pending is not None:
      bar.set_postfix(**report(*pending), refresh=False)
    pending = (out, done)
    bar.update(length)
    stop = _STOP.is_set()
    if after is not None:
      after(state, done, stop)
    if stop:
      raise Stopped(f"stopped on request after step {done} of {total}")
  if lag and pending is not None:
    bar.set_postfix(**report(*pending))
  return state, out


def finite(value, what, where):
  """``value`` as a float (the mean of an array); raises FloatingPointError if it, or any
  entry, is not finite."""
  a = np.asarray(value, np.float64)
  if not np.all(np.isfinite(a)):
    raise FloatingPointError(f"{what} is {a if a.ndim else float(a)} at {where}")
  return float(a.mean())
