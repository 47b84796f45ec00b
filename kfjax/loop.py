"""The host loop shared by Phase 1, Phase 2 and the kernel estimators.

Each of them compiles one ``chunk`` program (a ``lax.scan`` over a fixed number of steps)
and calls it until its work is done; between calls the host checks the losses, moves the
progress bar and maybe writes a checkpoint. Only the chunk and those three callbacks
differ, so the loop itself lives here once; :func:`run_resumable` adds the checkpoint
policy the estimators (KernelGAN, DDM4IP, IKE) share.
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


def last_values(metrics):
  """The last step's value of each field of a chunk's metrics (a NamedTuple of per-step
  arrays) as floats: a stage's final losses (``run_resumable``'s ``summarise``)."""
  return {f: float(v[-1]) for f, v in metrics._asdict().items()}


def run_resumable(chunk, state, saver, *, total, length, every, bar, report, summarise,
                  label, after=None, extra=None, show_progress=True):
  """:func:`run_chunks` for a stage whose state ``saver`` keeps (a
  :class:`kfjax.checkpoint.PhaseCheckpoint`; ``None``: no checkpoints).

  The state is restored from the saver's latest step (it must count steps as the loop does,
  in whole chunks of ``length``: the chunks fold the step into their random keys, so a
  resumed run draws what an uninterrupted one would), and saved when the step passes a
  multiple of ``every``, at the end, and on a stop. ``summarise(out)`` turns the last
  chunk's output into a JSON-able dict (final losses), kept beside the checkpoint so that a
  stage restored finished reports it too. ``extra``: ``(get, put)``, a pytree of host
  arrays the caller keeps outside the state (``get()`` is saved with it, ``put`` receives
  it on restore). Returns ``(state, final, restored_step)`` (``final`` is None for a stage
  restored finished from a checkpoint that lacks it; ``restored_step`` None on a fresh
  start).
  """
  def pack(st):
    return {"state": st, "extra": extra[0]()} if extra else {"state": st}
  restored = None
  step = saver.latest_step() if saver is not None else None
  if step is not None:
    got = saver.restore(step, pack(state))
    state = got["state"]
    if extra:
      extra[1](got["extra"])
    restored = int(step)
    if show_progress:
      log(f"resuming {label} from step {restored}/{total}")
  done = restored or 0
  bar.update(done)
  every, saved, last = max(int(every), length), [done], {}

  def tracked(st):
    st, out = chunk(st)
    last["out"] = out
    return st, out

  def after_chunk(st, at, stop):
    if after is not None:
      after(st, at, stop)
    if at >= total:  # (kept with the last checkpoint, also when a stop comes with it)
      last["final"] = summarise(last["out"])
    if saver is not None and (at // every > saved[0] // every or at >= total or stop):
      saver.save(at, pack(st))
      saved[0] = at
      if at >= total:
        saver.save_extra(final=last["final"])
  try:
    state, _ = run_chunks(tracked, state, done=done, total=total, length=length, bar=bar,
                          report=report, after=after_chunk)
  finally:  # (also on a stop: the last save must be complete before the process ends)
    if saver is not None:
      saver.close()
  if "final" in last:
    return state, last["final"], restored
  return state, saver.extra("final") if saver is not None else None, restored
