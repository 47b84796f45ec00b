"""The kernel estimators (KernelGAN, DDM4IP, IKE) checkpoint in a workdir and resume.

A stop (what SIGTERM requests) ends a run after its current chunk with a checkpoint; the
same call then goes on from there and must end exactly where an uninterrupted run ends
(every chunk folds its step into its random keys, and the restored state is the saved one
bit for bit). Smoke settings on the shared 32×32 test image: 4 steps per stage in chunks
of 2, a checkpoint after every chunk.
"""

import jax
import numpy as np
import pytest

from kfjax import config as config_lib
from kfjax import ddm4ip
from kfjax import ike
from kfjax import kernelgan
from kfjax import loop


def _kernelgan(cfg, img, workdir):
  raw, info, _ = kernelgan.train(cfg, img, 2, False, workdir)
  return raw, info, [info]


def _ddm4ip(cfg, img, workdir):
  raw, info, _ = ddm4ip.train(cfg, img, 2, False, workdir)
  return raw, info, [info["flow"], info["match"]]


def _ike(cfg, img, workdir):
  _, state, info = ike.train(cfg, img, 2, False, workdir)
  leaves = jax.tree.leaves(state._replace(it=np.zeros(())))   # every network and optimiser
  return np.concatenate([np.ravel(np.asarray(x)) for x in leaves]), info, [info]


RUNS = {"kernelgan": (_kernelgan, 1), "ddm4ip": (_ddm4ip, 2), "ike": (_ike, 1)}


@pytest.fixture(scope="module")
def cfg():
  return config_lib.preset("smoke")


@pytest.fixture(scope="module")
def uninterrupted(cfg, lr_image):
  return {name: run(cfg, lr_image, None) for name, (run, _) in RUNS.items()}


def _stopped(run, cfg, img, workdir):
  """``run`` with a stop requested before it starts: it must end in :class:`loop.Stopped`."""
  loop.request_stop()
  try:
    with pytest.raises(loop.Stopped):
      run(cfg, img, workdir)
  finally:
    loop.clear_stop()


@pytest.mark.parametrize("name", sorted(RUNS))
def test_stopped_after_every_chunk_ends_where_an_uninterrupted_run_ends(
    name, cfg, lr_image, uninterrupted, tmp_path):
  run, stages = RUNS[name]
  whole, whole_info, whole_stages = uninterrupted[name]
  wd = str(tmp_path)
  # One chunk per call: each call resumes from the previous one's checkpoint.
  for _ in range(2 * stages):
    _stopped(run, cfg, lr_image, wd)
  got, info, got_stages = run(cfg, lr_image, wd)     # everything restored finished
  np.testing.assert_array_equal(got, whole)
  for stage, ref in zip(got_stages, whole_stages):
    assert stage["restored_step"] == 4 and ref["restored_step"] is None
    # (the final losses come back with the finished checkpoint)
    assert stage.get("final", stage.get("final_loss")) == ref.get("final", ref.get("final_loss"))
  assert info.get("fallback") == whole_info.get("fallback")


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_run_stopped_once_resumes_and_finishes(name, cfg, lr_image, uninterrupted, tmp_path):
  run, _ = RUNS[name]
  whole = uninterrupted[name][0]
  wd = str(tmp_path)
  _stopped(run, cfg, lr_image, wd)
  got, _, stages = run(cfg, lr_image, wd)
  np.testing.assert_array_equal(got, whole)
  assert stages[0]["restored_step"] == 2


def test_other_settings_discard_the_checkpoint_but_post_processing_keeps_it(
    cfg, lr_image, uninterrupted, tmp_path, capsys):
  wd = str(tmp_path)
  _stopped(_ddm4ip, cfg, lr_image, wd)
  # Post-processing fields do not shape training: the checkpoint is kept.
  post = cfg.copy_and_resolve_references()
  post.ddm4ip.threshold, post.ddm4ip.max_radius = 0.5, 1.0
  _stopped(_ddm4ip, post, lr_image, wd)
  assert "discarding" not in capsys.readouterr().out
  # A training setting does: the checkpoint is discarded (with a line) and training
  # starts over (which, for the same settings, gives the uninterrupted result again).
  other = cfg.copy_and_resolve_references()
  other.ddm4ip.kernel_lr = 2 * float(cfg.ddm4ip.kernel_lr)
  _stopped(_ddm4ip, other, lr_image, wd)
  assert "discarding a DDM4IP flow checkpoint made with other settings" in capsys.readouterr().out
  got, info, _ = _ddm4ip(other, lr_image, wd)
  assert info["flow"]["restored_step"] == 2 and info["match"]["restored_step"] is None
  raw, _, stages = _ddm4ip(cfg, lr_image, wd)
  np.testing.assert_array_equal(raw, uninterrupted["ddm4ip"][0])
  assert [s["restored_step"] for s in stages] == [None, None]
  assert not np.array_equal(got, raw)
