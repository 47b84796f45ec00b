"""``kfjax.loop``: the host loop of Phase 1, Phase 2 and KernelGAN (no JAX needed)."""

import numpy as np
import pytest

from kfjax import loop


class Bar:
  def __init__(self):
    self.events = []

  def update(self, n):
    self.events.append(("update", n))

  def set_postfix(self, refresh=True, **kw):
    self.events.append(("postfix", kw))


def _chunk(state):
  """Adds one to the state; its output is the state before (a "loss" of that call)."""
  return state + 1, float(state)


@pytest.mark.parametrize("lag", [False, True])
def test_run_chunks_calls_reports_and_saves_in_order(lag):
  bar, reported, saved = Bar(), [], []

  def report(out, at):
    reported.append((out, at))
    return {"loss": out}
  state, out = loop.run_chunks(_chunk, 10, done=4, total=10, length=2, bar=bar, report=report,
                               after=lambda s, at, stop: saved.append((s, at, stop)), lag=lag)
  assert (state, out) == (13, 12.0)           # three calls: 10 -> 13
  assert reported == [(10.0, 6), (11.0, 8), (12.0, 10)]   # every call, once, in order
  assert saved == [(11, 6, False), (12, 8, False), (13, 10, False)]
  assert [e for e in bar.events if e[0] == "update"] == [("update", 2)] * 3
  # With lag, call n is reported only after call n + 1 has been dispatched.
  kinds = [e[0] for e in bar.events]
  if lag:
    assert kinds == ["update", "postfix", "update", "postfix", "update", "postfix"]
  else:
    assert kinds == ["postfix", "update"] * 3


def test_run_chunks_with_nothing_left_runs_nothing():
  state, out = loop.run_chunks(_chunk, 5, done=8, total=8, length=2, bar=Bar(),
                               report=lambda o, at: {}, lag=True)
  assert (state, out) == (5, None)


def test_finite_reports_the_mean_and_raises_on_nan():
  assert loop.finite(np.array([1.0, 3.0]), "loss", "step 1") == 2.0
  with pytest.raises(FloatingPointError, match=r"phase 2 loss is \[ 1. nan\] at iteration 7"):
    loop.finite(np.array([1.0, np.nan]), "phase 2 loss", "iteration 7")
  with pytest.raises(FloatingPointError, match="is inf at step 3"):
    loop.finite(np.inf, "loss", "step 3")


def test_a_stop_request_saves_after_the_current_chunk_and_raises():
  """SIGTERM's path: the chunk running when the stop comes finishes, ``after`` is told to
  save (``stop`` True), and the loop raises ``Stopped``; nothing runs after it."""
  calls, saved = [], []

  def chunk(state):
    calls.append(state)
    if state == 11:
      loop.request_stop()  # arrives while the second call runs
    return state + 1, float(state)
  try:
    with pytest.raises(loop.Stopped, match="after step 8 of 20"):
      loop.run_chunks(chunk, 10, done=4, total=20, length=2, bar=Bar(),
                      report=lambda o, at: {}, after=lambda s, at, stop: saved.append((s, at, stop)))
    assert calls == [10, 11]
    assert saved == [(11, 6, False), (12, 8, True)]
    with pytest.raises(loop.Stopped):
      loop.raise_if_stopped()
  finally:
    loop.clear_stop()
  loop.raise_if_stopped()  # cleared: no longer raises
