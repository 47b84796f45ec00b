"""Multi-process runs (``jax.distributed``) for batches of independent images.

The processes of a batch share nothing while they work: each runs its own share of the
images on its own devices (:mod:`kfjax.batch`). ``jax.distributed`` gives them their
index and count (and, on a TPU pod, their devices); its coordination service also lives
in process 0 and ends every process when one fails, unless told otherwise. So:

* :func:`initialize` turns on JAX's recoverable mode first, so that a process that dies
  (or is preempted) leaves the others running;
* process 0 hosts the service, so it must outlive the others: :func:`finish` waits until
  every other process is done or dead. If process 0 itself dies, the others stop too,
  within about a second: JAX's client polls the service for errors and ends its process
  when the service is gone (``jax.distributed.initialize`` passes no way to change that),
  and Orbax's checkpoints signal each other through the same service's key-value store,
  so a survivor could not save anyway. Each stops where a ``kill -9`` would (at most one
  checkpoint interval lost per image); re-running the command finishes what is missing.
"""

import os

# A process that sends no heartbeat for this long counts as dead (JAX's default is 100 s;
# heartbeats come from a background thread, so long computations do not delay them). It is
# also how long process 0 waits, at its end, for a process that was killed; set
# $KFJAX_HEARTBEAT_SECONDS to change it (shorter on a busy or flaky network is riskier: a
# live process that misses it is taken for dead).
HEARTBEAT_SECONDS = 30


def heartbeat_seconds(environ=os.environ):
  """``$KFJAX_HEARTBEAT_SECONDS`` (a whole number of seconds ≥ 2), else
  :data:`HEARTBEAT_SECONDS`; a bad value raises ``ValueError`` with one line."""
  raw = environ.get("KFJAX_HEARTBEAT_SECONDS", "").strip()
  if not raw:
    return HEARTBEAT_SECONDS
  try:
    value = int(raw)
  except ValueError:
    value = 0
  if value < 2:
    raise ValueError(f"KFJAX_HEARTBEAT_SECONDS must be a whole number of seconds >= 2, got {raw!r}")
  return value


def auto_detected(environ=os.environ):
  """Whether the environment is one process of several that ``jax.distributed`` detects
  by itself: an ``srun`` step of several SLURM tasks, or a multi-host Cloud TPU slice."""
  if "SLURM_STEP_ID" in environ and int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def initialize(coordinator=None, num_processes=None, process_id=None, timeout=300):
  """``jax.distributed.initialize`` in recoverable mode (the given coordinator, or the
  cluster's own detection); returns ``(process index, process count)``. Must run before
  anything starts JAX's backend."""
  heartbeat = heartbeat_seconds()
  import jax  # noqa: PLC0415
  jax.config.update("jax_enable_recoverability", True)
  if coordinator is not None:
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               initialization_timeout=timeout,
                               heartbeat_timeout_seconds=heartbeat)
  else:
    jax.distributed.initialize(initialization_timeout=timeout,
                               heartbeat_timeout_seconds=heartbeat)
  return jax.process_index(), jax.process_count()


def _client():
  # The distributed runtime client (private in JAX; Orbax reaches it the same way).
  from jax._src import distributed  # noqa: PLC0415
  return distributed.global_state.client


def finish(index, count, log=None):
  """Wait, at the end of this process's work, until every other process has finished or
  died: JAX's alive-tasks query blocks until all live tasks have made it, and a task that
  died (no heartbeat for :func:`heartbeat_seconds`) no longer counts. Process 0 hosts the
  coordination service, so it must not exit before the others; the others wait too,
  which costs them nothing but their exit."""
  client = _client()
  if client is None or count <= 1:
    return
  if log is not None and index == 0:
    log("waiting for the other processes to finish (process 0 hosts the coordination service)")
  import jax  # noqa: PLC0415
  everyone = list(range(count))
  try:
    client.get_live_nodes(everyone)  # every live process is done
    if index != 0:
      # Leave while the service is still there (at exit it may be gone already, which
      # JAX treats as a fatal error).
      jax.distributed.shutdown()
    else:
      # Returns once the others have left (a task that has shut down is not alive).
      client.get_live_nodes(everyone)
  except Exception as e:  # noqa: BLE001 - the service gone: nothing left to wait for
    if log is not None:
      log(f"could not wait for the other processes ({str(e).splitlines()[0][:120]})")
