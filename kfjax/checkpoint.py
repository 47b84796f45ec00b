"""Orbax checkpoints of the two phases, tied to the image and config they belong to.

Each phase keeps an Orbax ``CheckpointManager`` under ``<workdir>/checkpoints/<name>``
and a ``<name>.json`` fingerprint beside it (a hash of the input image and of the
config fields that shape the saved state). A checkpoint is only restored when the
fingerprint matches, so a workdir is never silently reused for another image.

Every checkpoint belongs to the one process that runs its image, also in a multi-process
run (``jax.distributed``), where processes save at unrelated times. Orbax's defaults
assume the opposite (every process joins every save: its ``jax.Array`` handler refuses
host-local arrays once ``jax.process_count() > 1``, its NumPy handler writes on process 0
only, and the step's metadata is written by process 0). So each manager is told it runs
on this process alone (``MultiprocessingOptions(primary_host=me, active_processes={me})``),
and the state's leaves are saved as NumPy arrays by :class:`LocalArrayHandler`, an Orbax
type handler (registered for this manager only) that writes from whichever process
saves. The same format serves single- and multi-process runs, so a checkpoint written by
one resumes in the other. Checkpoints written before this format (``"format"`` absent
from the fingerprint file) are still restored, with Orbax's standard handlers.
"""

import hashlib
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from kfjax import io as kio
from kfjax import loop

FORMAT = "local-npy-1"


class _QuietMerge(logging.Filter):
  """Orbax's PyTree handler always tries to merge per-process OCDBT files after a save,
  and warns when, as here (``use_ocdbt=False``), there are none; that warning would
  otherwise reach the user at every checkpoint."""

  def filter(self, record):
    return "Skipping merge of OCDBT checkpoints" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietMerge())


def fingerprint(*parts):
  """A short hex digest of arrays, strings and JSON-able values."""
  h = hashlib.sha256()
  for p in parts:
    if isinstance(p, np.ndarray):
      h.update(str((p.shape, p.dtype.str)).encode())
      h.update(np.ascontiguousarray(p).tobytes())
    else:
      h.update(json.dumps(p, sort_keys=True, default=str).encode())
  return h.hexdigest()[:16]


class LocalArrayHandler(ocp.type_handlers.TypeHandler):
  """Orbax type handler: a NumPy leaf as one ``.npy`` file, written by the saving process.

  Used with ``use_ocdbt=False`` (one file per leaf under the step's item directory);
  Orbax still owns the step directories, their atomic finalisation, metadata and
  retention."""

  def typestr(self):
    return "kfjax.local_npy"

  @staticmethod
  def _file(info):
    return info.parent_dir / f"{info.name}.npy"

  async def metadata(self, infos):
    out = []
    for info in infos:
      a = np.load(self._file(info), mmap_mode="r")
      out.append(ocp.metadata.ArrayMetadata(name=info.name, directory=info.parent_dir,
                                            shape=a.shape, sharding=None, dtype=a.dtype))
    return out

  async def serialize(self, values, infos, args=None):
    # Written here and now (the states are small): Orbax's deferred commit futures
    # coordinate through jax.distributed's key-value store under keys that are not
    # unique across processes, so two processes saving at once could wait on each other.
    del args
    for value, info in zip(values, infos):
      await info.await_path_creation()
      with open(self._file(info), "wb") as f:
        np.save(f, np.asarray(value), allow_pickle=False)
    return []

  async def deserialize(self, infos, args=None):
    del args
    return [np.load(self._file(info), allow_pickle=False) for info in infos]


def _is_key(x):
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_host(state):
  """``state`` with every leaf a NumPy array (typed PRNG keys as their raw key data)."""
  return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if _is_key(x) else x), state)


def from_host(arrays, like):
  """The inverse of :func:`to_host`, into the structure, key types and placement of
  ``like``."""
  def back(a, ref):
    if _is_key(ref):
      return jax.random.wrap_key_data(jnp.asarray(a), impl=jax.random.key_impl(ref))
    a = np.asarray(a)
    if a.dtype.kind == "V":  # ml_dtypes (bfloat16) come back from .npy as raw bytes
      a = a.view(ref.dtype)
    return jnp.asarray(a, dtype=ref.dtype)
  return jax.tree.map(back, arrays, like)


class PhaseCheckpoint:
  """Save/restore one phase's state pytree, guarded by a fingerprint."""

  def __init__(self, workdir, name, fp, max_to_keep=1):
    self.root = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.path = os.path.join(self.root, name)
    self.meta_path = os.path.join(self.root, name + ".json")
    self.fp = fp
    self.max_to_keep = max_to_keep
    self._mngr = None

  def stored_fingerprint(self):
    if not os.path.exists(self.meta_path):
      return None
    with open(self.meta_path) as f:
      return json.load(f).get("fingerprint")

  def matches(self):
    return self.stored_fingerprint() == self.fp

  def reset(self):
    """Delete a checkpoint (of any fingerprint) and claim the directory for ours."""
    self.close()
    shutil.rmtree(self.path, ignore_errors=True)
    kio.save_text_atomic(self.meta_path, json.dumps({"fingerprint": self.fp, "format": FORMAT}))

  def save_extra(self, **fields):
    """Keep small JSON-able ``fields`` beside the fingerprint (e.g. a finished run's final
    losses, which a later restore reports); :meth:`reset` drops them."""
    if not self.matches():
      self.reset()
    with open(self.meta_path) as f:
      meta = json.load(f)
    meta.update(fields)
    kio.save_text_atomic(self.meta_path, json.dumps(meta))

  def extra(self, key):
    """A field stored by :meth:`save_extra` under our fingerprint, or ``None``."""
    if not self.matches():
      return None
    with open(self.meta_path) as f:
      return json.load(f).get(key)

  def _format(self):
    if not self.matches():
      return None
    with open(self.meta_path) as f:
      return json.load(f).get("format")

  @property
  def manager(self):
    if self._mngr is None:
      if self._format() == FORMAT or not os.path.isdir(self.path):
        me = jax.process_index()
        local = ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"kfjax-p{me}")
        # (jax.Array keeps Orbax's handler only so that Orbax finds one; every leaf
        # arrives here as NumPy)
        registry = ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, LocalArrayHandler()), (jax.Array, ocp.type_handlers.ArrayHandler()))
        handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, multiprocessing_options=local,
                                              type_handler_registry=registry)
        # (with active_processes Orbax leaves creating the root folder to the caller)
        os.makedirs(self.path, exist_ok=True)
        # Synchronous saves: see LocalArrayHandler.serialize.
        opts = ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=False,
                                            multiprocessing_options=local,
                                            enable_async_checkpointing=False)
        self._mngr = ocp.CheckpointManager(self.path, options=opts, item_handlers=handler)
        self._local = True
      else:  # a checkpoint of the earlier format: Orbax's standard handlers read it
        opts = ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True)
        self._mngr = ocp.CheckpointManager(self.path, options=opts)
        self._local = False
    return self._mngr

  def latest_step(self):
    if not self.matches() or not os.path.isdir(self.path):
      return None
    return self.manager.latest_step()

  def save(self, step, state):
    if not self.matches() or self._format() != FORMAT:
      self.reset()  # (a checkpoint of the earlier format is replaced, not extended)
    self.manager.save(int(step), args=ocp.args.PyTreeSave(to_host(state)))

  def restore(self, step, like):
    """Restore into the structure (and key types) of ``like``."""
    mngr = self.manager
    if not self._local:
      target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
      return mngr.restore(int(step), args=ocp.args.StandardRestore(target))
    target = to_host(like)
    arrays = mngr.restore(int(step), args=ocp.args.PyTreeRestore(
        target, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                          target)))
    return from_host(arrays, like)

  def wait(self):
    if self._mngr is not None:
      self._mngr.wait_until_finished()

  def close(self):
    if self._mngr is not None:
      self._mngr.wait_until_finished()
      self._mngr.close()
      self._mngr = None


def discarding_saver(workdir, name, fp, label):
  """``PhaseCheckpoint(workdir, name, fp)``; one made with other settings (or for another
  image) is discarded with a line saying so: for stages that take minutes and whose settings
  are tuned often (Phase 2, the kernel estimators), unlike Phase 1's PD."""
  saver = PhaseCheckpoint(workdir, name, fp)
  if saver.stored_fingerprint() not in (None, fp):
    loop.log(f"discarding a {label} checkpoint made with other settings in {workdir}")
    saver.reset()
  return saver


def block_fingerprint(image, block, *parts, skip=()):
  """Fingerprint of an estimator's run: the input image, its config ``block`` without the
  fields in ``skip`` (those that only shape what happens after training, or when it is
  saved), and ``parts`` (seed, scale, ...)."""
  fields = {k: v for k, v in block.to_dict().items() if k not in skip}
  return fingerprint(np.asarray(image), fields, *parts)
