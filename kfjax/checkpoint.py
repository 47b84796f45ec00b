"""Orbax checkpoints of the two phases, tied to the image and config they belong to.

Each phase keeps an Orbax ``CheckpointManager`` under ``<workdir>/checkpoints/<name>``
and a ``<name>.json`` fingerprint beside it (a hash of the input image and of the
config fields that shape the saved state). A checkpoint is only restored when the
fingerprint matches, so a workdir is never silently reused for another image.
"""

import hashlib
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from kfjax import io as kio


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
    kio.save_text_atomic(self.meta_path, json.dumps({"fingerprint": self.fp}))

  def save_extra(self, **fields):
    """Keep small JSON-able ``fields`` beside the fingerprint (e.g. a finished run's final
    losses, which a later restore reports); :meth:`reset` drops them."""
    meta = {"fingerprint": self.fp}
    if self.matches():
      with open(self.meta_path) as f:
        meta.update(json.load(f))
    meta.update(fields)
    kio.save_text_atomic(self.meta_path, json.dumps(meta))

  def extra(self, key):
    """A field stored by :meth:`save_extra` under our fingerprint, or ``None``."""
    if not self.matches():
      return None
    with open(self.meta_path) as f:
      return json.load(f).get(key)

  @property
  def manager(self):
    if self._mngr is None:
      opts = ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True)
      self._mngr = ocp.CheckpointManager(self.path, options=opts)
    return self._mngr

  def latest_step(self):
    if not self.matches() or not os.path.isdir(self.path):
      return None
    return self.manager.latest_step()

  def save(self, step, state):
    if not self.matches():
      self.reset()
    self.manager.save(int(step), args=ocp.args.StandardSave(state))

  def restore(self, step, like):
    """Restore into the structure (and shardings) of ``like``."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self.manager.restore(int(step), args=ocp.args.StandardRestore(target))

  def wait(self):
    if self._mngr is not None:
      self._mngr.wait_until_finished()

  def close(self):
    if self._mngr is not None:
      self._mngr.wait_until_finished()
      self._mngr.close()
      self._mngr = None
