"""Tests for the training CheckpointManager section of tvr_jax.checkpointing."""

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from tvr_jax import checkpointing


def _state(width=8, seed=0):
  k = jax.random.key(seed)
  return {"params": {"dense": {"kernel": jax.random.normal(k, (4, width)),
                               "bias": jnp.zeros((width,))}},
          "step": jnp.asarray(seed, jnp.int32)}


def _abstract(tree):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def test_round_trip_latest_and_best(tmp_path):
  mgr = checkpointing.TrainCheckpointManager(tmp_path, keep=2, best_metric="t2v/R@1")
  r1 = {1: 10.0, 2: 50.0, 3: 20.0, 4: 5.0, 5: None}
  for step, r in r1.items():
    mgr.save(step, _state(seed=step), data_state={"epoch": 0, "index": step},
             metrics=None if r is None else {"t2v/R@1": r}, meta={"model": "tiny"})
  mgr.close()
  mgr = checkpointing.TrainCheckpointManager(tmp_path, keep=2, best_metric="t2v/R@1")
  # Latest two (4, 5) and the best by t2v/R@1 (2) survive.
  assert mgr.all_steps() == [2, 4, 5]
  assert mgr.latest_step() == 5 and mgr.best_step() == 2
  state, data, meta = mgr.restore(2, _abstract(_state()), {"model": "tiny"})
  np.testing.assert_array_equal(np.asarray(state["params"]["dense"]["kernel"]),
                                np.asarray(_state(seed=2)["params"]["dense"]["kernel"]))
  assert int(state["step"]) == 2 and data == {"epoch": 0, "index": 2} and meta == {"model": "tiny"}
  # Bytes iterator states (Grain's) round-trip too.
  mgr.save(6, _state(seed=6), data_state=b"\x00grain\xff")
  mgr.wait()
  assert mgr.restore(6, _abstract(_state()))[1] == b"\x00grain\xff"
  mgr.close()


def test_other_model_size_and_meta_are_clear_errors(tmp_path):
  mgr = checkpointing.TrainCheckpointManager(tmp_path)
  mgr.save(3, _state(width=8), meta={"clip": "tiny"})
  mgr.wait()
  before = sorted(os.listdir(tmp_path / "3" / "state"))
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"different model size: params/dense/bias has shape \(8,\)"):
    mgr.restore(3, _abstract(_state(width=16)))
  with pytest.raises(checkpointing.CheckpointError,
                     match="other settings .*\n  clip: 'tiny' -> 'ViT-B/32'"):
    mgr.restore(3, _abstract(_state()), {"clip": "ViT-B/32"})
  assert sorted(os.listdir(tmp_path / "3" / "state")) == before
  mgr.close()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
  mgr = checkpointing.TrainCheckpointManager(tmp_path)
  mgr.save(7, _state())
  mgr.close()
  # Damage the state item: remove its metadata and array store.
  state_dir = tmp_path / "7" / "state"
  for name in os.listdir(state_dir):
    p = state_dir / name
    shutil.rmtree(p) if p.is_dir() else p.unlink()
  (state_dir / "garbage").write_text("not a checkpoint")
  mgr = checkpointing.TrainCheckpointManager(tmp_path)
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"checkpoint .*7.* (unreadable|corrupt|no readable)"):
    mgr.restore(7, _abstract(_state()))
  assert (state_dir / "garbage").read_text() == "not a checkpoint"   # nothing overwritten
  mgr.close()


def test_process_killed_mid_save_keeps_last_good_checkpoint(tmp_path):
  """SIGKILL right after an async save starts: the half-written step never becomes the latest."""
  code = textwrap.dedent(f"""
    import os, signal, jax, jax.numpy as jnp
    from tvr_jax import checkpointing
    mgr = checkpointing.TrainCheckpointManager({str(tmp_path)!r}, async_save=True)
    small = {{"w": jnp.ones((4,))}}
    mgr.save(1, small); mgr.wait()
    # 256 MB: the write takes a while
    big = {{"w": jnp.ones((4,)), "x": jnp.ones((64, 1024, 1024))}}
    mgr.save(2, big)
    # Kill once the write is visibly under way (its tmp directory exists), before it can finalize.
    while not [n for n in os.listdir({str(tmp_path)!r}) if n.startswith("2") and "tmp" in n]:
      pass
    print("saving", sorted(os.listdir({str(tmp_path)!r})), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
  """)
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert "saving" in proc.stdout
  leftovers = [n for n in os.listdir(tmp_path) if n.startswith("2")]
  assert leftovers and all("tmp" in n for n in leftovers), os.listdir(tmp_path)   # never finalized
  mgr = checkpointing.TrainCheckpointManager(tmp_path)
  assert mgr.latest_step() == 1 and mgr.all_steps() == [1]
  state, _, _ = mgr.restore(1, _abstract({"w": jnp.ones((4,))}))
  np.testing.assert_array_equal(np.asarray(state["w"]), np.ones(4))
  # The stale tmp directory of the killed save is cleaned up on the next start.
  assert not [n for n in os.listdir(tmp_path) if n.startswith("2")]
  mgr.close()
