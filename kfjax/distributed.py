"""Multi-process runs (``jax.distributed``) for batches of independent images.

The processes of a batch share nothing while they work: each runs its own share of the
images on its own devices (:mod:`kfjax.batch`). ``jax.distributed`` gives them their
index and count (and, on a TPU pod, their devices); its coordination service also lives
in process 0 and ends every process when one fails, unless told otherwise. So:

* :func:`initialize` turns on JAX's recoverable mode first, so that a process that dies
  (or is preempted) leaves the others running;
* process 0 hosts the service, so it must outlive the others: :func:`finish` marks this
  process done in the service's key-value store, and process 0 waits until every other
  process is done or dead before it returns. If process 0 itself dies, the others stop
  too; re-running the command finishes what is missing.
"""

import os
import time

DONE_KEY = "kfjax/batch/done/{}"


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
  import jax  # noqa: PLC0415
  jax.config.update("jax_enable_recoverability", True)
  if coordinator is not None:
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               initialization_timeout=timeout)
  else:
    jax.distributed.initialize(initialization_timeout=timeout)
  return jax.process_index(), jax.process_count()


def _client():
  # The distributed runtime client (private in JAX; Orbax reaches it the same way).
  from jax._src import distributed  # noqa: PLC0415
  return distributed.global_state.client


def finish(index, count, poll=1.0, log=None):
  """Mark process ``index`` done; on process 0, wait until each other process is done or
  no longer alive (so the coordination service outlives them)."""
  client = _client()
  if client is None or count <= 1:
    return
  client.key_value_set(DONE_KEY.format(index), "1", allow_overwrite=True)
  if index != 0:
    return
  waiting = set(range(1, count))
  told = False
  while waiting:
    for j in sorted(waiting):
      try:
        done = client.key_value_try_get(DONE_KEY.format(j)) == "1"
      except Exception:  # noqa: BLE001 - NOT_FOUND: not done yet
        done = False
      if done:
        waiting.discard(j)
    if waiting:
      try:
        alive = set(client.get_live_nodes(sorted(waiting)))
      except Exception:  # noqa: BLE001 - the service cannot say: assume alive
        alive = set(waiting)
      waiting &= alive
    if waiting:
      if not told and log is not None:
        log(f"process 0 waits for process(es) {sorted(waiting)} to finish "
            "(it hosts the coordination service)")
        told = True
      time.sleep(poll)
