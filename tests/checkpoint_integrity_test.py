"""Integrity under faults: checksummed checkpoints, fallback to the newest intact step, finite
saves, resume rules (recorded objective and model switches), and a full disk.

Unit tests drive `tvr_jax.checkpointing` directly; the end-to-end ones resume copies of one short
synthetic run (8 steps, checkpoints at 4 and 8) with `train.train_and_evaluate`.
"""

import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import REPO_ROOT, main_command, smoke_config, subprocess_env
from tvr_jax import checkpointing, train
from tvr_jax.models import build as build_lib
from tvr_jax.models import retrieval


# --------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------
def reference_checksum(x) -> tuple[int, int]:
  """Brute force: the leaf's words as Python ints, sums taken modulo 2**32."""
  x = np.asarray(x)
  if x.dtype == np.bool_:
    words = x.astype(np.uint64)
  else:
    words = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint64)
  words = [int(w) for w in words.reshape(-1)]
  plain = sum(words) % 2**32
  weighted = sum((2 * i + 1) * w for i, w in enumerate(words)) % 2**32
  return plain, weighted


def largest_file(directory) -> str:
  files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def flip_bytes(step_dir, n=4096) -> str:
  """Overwrites `n` bytes in the middle of the step's largest array file with 0xFF (same size)."""
  path = largest_file(os.path.join(step_dir, "state"))
  size = os.path.getsize(path)
  assert size > 2 * n, (path, size)
  with open(path, "r+b") as f:
    f.seek(size // 2)
    f.write(b"\xff" * n)
  assert os.path.getsize(path) == size
  return path


def truncate(step_dir) -> str:
  path = largest_file(os.path.join(step_dir, "state"))
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  return path


def snapshot(directory) -> dict:
  """{relative path: (size, mtime_ns)} of every file and directory under `directory`."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      p = os.path.join(root, name)
      st = os.stat(p)
      out[os.path.relpath(p, directory)] = (st.st_size if name in files else 0, st.st_mtime_ns)
  return out


def _state(seed=0, width=256):
  k = jax.random.key(seed)
  return {"params": {"w": jax.random.normal(k, (64, width)), "b": jnp.arange(5, dtype=jnp.float32)},
          "opt": {"mu": jnp.ones((64, width)) * seed}, "step": jnp.asarray(seed, jnp.int32)}


def _abstract(tree):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


# --------------------------------------------------------------------------------------------------
# Checksums.
# --------------------------------------------------------------------------------------------------
def test_checksums_match_brute_force_reference():
  rng = np.random.default_rng(0)
  tree = {"f32": rng.standard_normal((7, 5)).astype(np.float32),
          "bf16": rng.standard_normal((3, 4, 2)).astype(ml_dtypes.bfloat16),
          "i32": rng.integers(-2**31, 2**31 - 1, (11,), dtype=np.int32),
          "u32": np.array([2**32 - 1, 2**31, 7], np.uint32),   # sums wrap around
          "u8": rng.integers(0, 256, (4, 4), dtype=np.uint8),
          "flag": np.array([True, False, True]), "scalar": np.float32(3.5)}
  sums, nonfinite = checkpointing.state_integrity(tree)
  assert nonfinite == []
  for key, leaf in tree.items():
    assert tuple(sums[key]) == reference_checksum(leaf), key


def test_checksums_see_one_flipped_bit_and_swapped_blocks():
  x = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
  base = checkpointing.state_integrity({"x": x})[0]["x"]
  flipped = x.copy()
  flipped.view(np.uint32)[3, 5] ^= 1 << 7
  swapped = x.copy()
  swapped[[2, 6]] = swapped[[6, 2]]
  got_flip = checkpointing.state_integrity({"x": flipped})[0]["x"]
  got_swap = checkpointing.state_integrity({"x": swapped})[0]["x"]
  assert got_flip[0] != base[0] and got_flip[1] != base[1]
  assert got_swap[0] == base[0]            # the plain sum cannot see a permutation ...
  assert got_swap[1] != base[1]            # ... the position-weighted one does
  bad = x.copy()
  bad[0, 0] = np.nan
  assert checkpointing.state_integrity({"x": bad, "y": x})[1] == ["x"]


@pytest.mark.devices(8)
def test_checksums_do_not_depend_on_sharding():
  """8 devices, leaves sharded over 8 or 2x4 (and replicated): the same sums as one device."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  rng = np.random.default_rng(0)
  tree = {"a": rng.standard_normal((64, 24)).astype(np.float32),
          "b": rng.integers(0, 2**31, (16, 8, 4), dtype=np.int32).astype(np.uint32),
          "c": rng.standard_normal((3,)).astype(np.float32)}
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  specs = {"a": P(("data", "fsdp")), "b": P("data", "fsdp"), "c": P()}
  sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}
  one = {k: jax.device_put(v, jax.devices()[0]) for k, v in tree.items()}
  assert len(sharded["a"].sharding.device_set) == 8
  sums_sharded = checkpointing.state_integrity(sharded)[0]
  assert sums_sharded == checkpointing.state_integrity(one)[0]
  assert list(sums_sharded["a"]) == list(reference_checksum(tree["a"]))


# --------------------------------------------------------------------------------------------------
# The manager: damaged steps, fallback, finite saves.
# --------------------------------------------------------------------------------------------------
def test_flipped_bytes_are_detected_and_restore_falls_back(tmp_path, caplog):
  mgr = checkpointing.TrainCheckpointManager(tmp_path, async_save=False)
  mgr.save(4, _state(4), meta={"model.tau": 0.6})
  mgr.save(8, _state(8), meta={"model.tau": 0.6})
  mgr.close()
  flip_bytes(tmp_path / "8")
  mgr = checkpointing.TrainCheckpointManager(tmp_path, read_only=True)
  with pytest.raises(checkpointing.CheckpointError, match=r"checkpoint .*8.*checksum mismatch"):
    mgr.restore(8, _abstract(_state()), {"model.tau": 0.6})
  with caplog.at_level(logging.WARNING):
    restored = mgr.restore_latest(_abstract(_state()), {"model.tau": 0.6})
  assert restored.step == 4 and [s for s, _ in restored.skipped] == [8]
  assert "checksum mismatch" in restored.skipped[0][1]
  assert any("step 8" in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)
  np.testing.assert_array_equal(np.asarray(restored.state["params"]["w"]),
                                np.asarray(_state(4)["params"]["w"]))
  # The search path (host NumPy restore of the parameters) verifies them too.
  with pytest.raises(checkpointing.CheckpointError, match="checksum mismatch"):
    checkpointing.restore_train_params(tmp_path / "8")
  np.testing.assert_array_equal(checkpointing.restore_train_params(tmp_path / "4")["w"],
                                np.asarray(_state(4)["params"]["w"]))
  mgr.close()


def test_every_step_damaged_is_one_clear_error(tmp_path):
  mgr = checkpointing.TrainCheckpointManager(tmp_path, async_save=False)
  mgr.save(4, _state(4))
  mgr.save(8, _state(8))
  mgr.close()
  flip_bytes(tmp_path / "8")
  truncate(tmp_path / "4")
  before = snapshot(tmp_path)
  mgr = checkpointing.TrainCheckpointManager(tmp_path, read_only=True)
  with pytest.raises(checkpointing.CheckpointError, match=r"no intact checkpoint") as e:
    mgr.restore_latest(_abstract(_state()))
  assert "step 8: " in str(e.value) and "step 4: " in str(e.value)
  mgr.close()
  assert snapshot(tmp_path) == before


def test_save_refuses_non_finite_state(tmp_path):
  mgr = checkpointing.TrainCheckpointManager(tmp_path, async_save=False)
  mgr.save(1, _state(1))
  bad = _state(2)
  bad["params"]["w"] = bad["params"]["w"].at[3, 3].set(jnp.inf)
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"step 2: non-finite .* params/w.*still step 1"):
    mgr.save(2, bad)
  mgr.close()
  assert sorted(os.listdir(tmp_path)) == ["1"]


def test_set_aside_damaged_step_is_kept_and_no_longer_a_step(tmp_path):
  mgr = checkpointing.TrainCheckpointManager(tmp_path, async_save=False)
  mgr.save(4, _state(4))
  mgr.save(8, _state(8))
  mgr.close()
  aside = checkpointing.set_aside_damaged(tmp_path / "8", "checksum mismatch in params/w")
  assert aside == str(tmp_path / "8.damaged")
  assert "checksum mismatch" in open(os.path.join(aside, "DAMAGED.txt")).read()
  mgr = checkpointing.TrainCheckpointManager(tmp_path, async_save=False)
  assert mgr.all_steps() == [4]
  mgr.save(8, _state(9))   # the step number is free again
  mgr.close()
  assert sorted(os.listdir(tmp_path)) == ["4", "8", "8.damaged"]


def test_meta_differences_are_listed_and_can_be_allowed(tmp_path):
  mgr = checkpointing.TrainCheckpointManager(tmp_path, async_save=False)
  saved = {"model.tau": 0.6, "optimizer.b2": 0.98, "seed": 0, "optimizer.groups": [[".*", 1e-3]]}
  mgr.save(1, _state(1), meta=saved)
  now = dict(saved, **{"model.tau": 0.3, "optimizer.b2": 0.5},
             **{"optimizer.groups": [(".*", 1e-3)]})   # tuples equal lists (JSON)
  with pytest.raises(checkpointing.CheckpointError) as e:
    mgr.restore(1, _abstract(_state()), now)
  assert "model.tau: 0.6 -> 0.3" in str(e.value) and "optimizer.b2: 0.98 -> 0.5" in str(e.value)
  assert "groups" not in str(e.value) and "seed" not in str(e.value)
  with pytest.raises(checkpointing.CheckpointError, match="optimizer.b2"):
    mgr.restore(1, _abstract(_state()), now, allow_changes=["model.tau"])
  _, _, meta = mgr.restore(1, _abstract(_state()), now, allow_changes=["model.tau", "optimizer.b2"])
  assert meta["model.tau"] == 0.6
  mgr.close()


DISK_FULL_SCRIPT = """
import os, sys, jax
from tvr_jax import checkpointing
d = sys.argv[1] + "/checkpoints"
w = jax.random.normal(jax.random.key(0), (1024, 1024))    # 4 MiB per step, 6 MiB of disk
mgr = checkpointing.TrainCheckpointManager(d, async_save=True)
mgr.save(1, {"w": w}); mgr.wait()
try:
  mgr.save(2, {"w": w + 1}); mgr.wait()
  print("NO ERROR")
except checkpointing.CheckpointWriteError as e:
  print("ERROR", e)
mgr.close()
print("LEFT", sorted(os.listdir(d)))
r = checkpointing.TrainCheckpointManager(d, read_only=True)
import numpy as np
state, _, _ = r.restore(1, {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=w.sharding)})
print("INTACT", bool(np.array_equal(np.asarray(state["w"]), np.asarray(w))))
"""


def _tmpfs_command(size: str, directory: str, command: str) -> list[str]:
  """`command` run in a private mount namespace with a tmpfs of `size` on `directory`."""
  return ["unshare", "-m", "sh", "-c",
          f"mount -t tmpfs -o size={size} tmpfs {directory} && {command}"]


def _require_tmpfs(tmp_path):
  probe = tmp_path / "probe"
  probe.mkdir()
  try:
    r = subprocess.run(_tmpfs_command("1m", str(probe), "true"), capture_output=True, text=True)
  except FileNotFoundError:
    pytest.skip("`unshare` is not installed: cannot mount a small tmpfs to fill")
  if r.returncode != 0:
    pytest.skip(f"mounting a tmpfs is not permitted here ({r.stderr.strip()[:200]})")


def test_disk_full_is_one_error_and_leaves_no_tmp_dir(tmp_path):
  _require_tmpfs(tmp_path)
  disk = tmp_path / "disk"
  disk.mkdir()
  script = tmp_path / "fill.py"
  script.write_text(DISK_FULL_SCRIPT)
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
  r = subprocess.run(_tmpfs_command("6m", str(disk), f"{sys.executable} {script} {disk}"),
                     capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.splitlines()
  error = [line for line in lines if line.startswith("ERROR")]
  assert error, r.stdout
  assert f"checkpoint step 2 into {disk}/checkpoints: no space left on the device" in error[0]
  assert "MiB free of 6.0 MiB" in error[0]
  assert "LEFT ['1']" in lines                 # no 2.orbax-checkpoint-tmp left behind
  assert "INTACT True" in lines
  assert "Traceback" not in r.stderr           # Orbax's thread tracebacks stay off the console


# --------------------------------------------------------------------------------------------------
# Model meta: the whole RetrievalConfig is recorded.
# --------------------------------------------------------------------------------------------------
def test_model_meta_records_every_retrieval_switch():
  c = smoke_config("unused")
  meta = build_lib.model_meta(c)
  fields = retrieval.RetrievalConfig().to_dict()
  for field in fields:
    key = {"max_words": "max_words", "max_frames": "num_frames"}.get(field, f"model.{field}")
    assert key in meta, key
  assert meta["model.textual_attention"] is True and meta["num_frames"] == c.num_frames
  assert meta["clip.vision_width"] == build_lib.clip_config(c).vision_width
  c.model.visual_attention = False
  assert build_lib.model_meta(c)["model.visual_attention"] is False
  # Evaluation compares the switches, not the loss-only fields.
  keys = build_lib.eval_meta_keys(meta)
  assert "model.textual_attention" in keys and "model.header" in keys and "model.tau" not in keys


def test_checkpoint_meta_records_objective_not_operational_keys():
  c = smoke_config("unused")
  meta = train.checkpoint_meta(c)
  for key in ("seed", "batch_size", "optimizer.b2", "optimizer.weight_decay", "model.tau",
              "model.contrastive_loss", "num_train_steps", "dataset", "train_split"):
    assert key in meta, key
  for key in ("data_dir", "log_every", "progress_bar", "checkpoint_every", "num_workers",
              "eval_batch_size", "mesh.data", "mode", "resume_allow_changes"):
    assert key not in meta, key
  c.resume_allow_changes = "optimizer.b2,not_a_key"
  with pytest.raises(train.ConfigError, match="not_a_key"):
    train.resume_checks(c)


# --------------------------------------------------------------------------------------------------
# End to end: resuming copies of one short run.
# --------------------------------------------------------------------------------------------------
def _run_config(data_dir, **overrides):
  base = dict(num_train_steps=8, checkpoint_every=4, eval_max_examples=8, log_every=4)
  return smoke_config(data_dir, **{**base, **overrides})


@pytest.fixture(scope="module")
def finished_run(small_synthetic_data, tmp_path_factory):
  """A finished 8-step synthetic run with checkpoints at steps 4 and 8."""
  workdir = str(tmp_path_factory.mktemp("finished_run") / "run")
  train.train_and_evaluate(_run_config(small_synthetic_data), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
  return workdir


def _copy(run, tmp_path) -> str:
  dst = str(tmp_path / "run")
  shutil.copytree(run, dst)
  return dst


def _params(step_dir):
  return {k: np.asarray(v) for k, v in
          checkpointing.flatten_params(checkpointing.restore_train_params(step_dir)).items()}


def test_bitflipped_latest_step_resumes_from_the_intact_one(finished_run, small_synthetic_data,
                                                            tmp_path, caplog):
  run = _copy(finished_run, tmp_path)
  ckpt = os.path.join(run, "checkpoints")
  pristine = _params(os.path.join(finished_run, "checkpoints", "8"))
  flip_bytes(os.path.join(ckpt, "8"))
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(_run_config(small_synthetic_data), run)
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert any("step 8" in w and "checksum mismatch" in w for w in warnings), warnings
  # Set aside (kept, with the reason), and step 8 trained again from step 4.
  assert sorted(os.listdir(ckpt)) == ["4", "8", "8.damaged"]
  assert "checksum mismatch" in open(os.path.join(ckpt, "8.damaged", "DAMAGED.txt")).read()
  again = _params(os.path.join(ckpt, "8"))
  assert all(np.isfinite(v).all() for v in again.values())
  for key, value in pristine.items():   # the resume from step 4 is exact
    np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_truncated_latest_step_is_skipped_when_evaluating(finished_run, small_synthetic_data,
                                                           tmp_path, caplog):
  run = _copy(finished_run, tmp_path)
  truncate(os.path.join(run, "checkpoints", "8"))
  with caplog.at_level(logging.WARNING):
    metrics = train.train_and_evaluate(_run_config(small_synthetic_data, mode="eval"), run)
  assert "t2v/R@1" in metrics
  assert os.path.isfile(os.path.join(run, "eval_step_4.json"))   # evaluated step 4
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert any("step 8" in w for w in warnings), warnings
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["4", "8"]   # eval only reads


def test_every_step_damaged_stops_without_touching_them(finished_run, small_synthetic_data,
                                                        tmp_path):
  run = _copy(finished_run, tmp_path)
  flip_bytes(os.path.join(run, "checkpoints", "8"))
  truncate(os.path.join(run, "checkpoints", "4"))
  before = snapshot(os.path.join(run, "checkpoints"))
  config_before = open(os.path.join(run, "config_train.json")).read()
  with pytest.raises(checkpointing.CheckpointError, match="no intact checkpoint") as e:
    train.train_and_evaluate(_run_config(small_synthetic_data, seed=0), run)
  assert "step 8: " in str(e.value) and "step 4: " in str(e.value)
  assert snapshot(os.path.join(run, "checkpoints")) == before
  assert open(os.path.join(run, "config_train.json")).read() == config_before


OBJECTIVE_CHANGES = [
    ("model.contrastive_loss", "infonce"), ("optimizer.weight_decay", 0.9), ("optimizer.b2", 0.5),
    ("model.tau", 0.3), ("seed", 1), ("batch_size", 16), ("num_train_steps", 16),
    ("optimizer.groups", [(".*", 5e-4)]), ("model.header", "seqTransf"),
]


@pytest.mark.parametrize("key,value", OBJECTIVE_CHANGES, ids=[k for k, _ in OBJECTIVE_CHANGES])
def test_changed_objective_is_refused_before_anything_is_written(finished_run, small_synthetic_data,
                                                                 tmp_path, key, value):
  run = _copy(finished_run, tmp_path)
  before = snapshot(run)
  c = _run_config(small_synthetic_data, **{key: value})
  with pytest.raises(checkpointing.CheckpointError) as e:
    train.train_and_evaluate(c, run)
  assert f"\n  {key}: " in str(e.value) and "resume_allow_changes" in str(e.value)
  assert snapshot(run) == before   # no log line, no config_train.json, no TensorBoard file


def test_every_difference_is_listed_and_allowing_them_resumes(finished_run, small_synthetic_data,
                                                              tmp_path, caplog):
  run = _copy(finished_run, tmp_path)
  changes = {"model.contrastive_loss": "infonce", "optimizer.weight_decay": 0.9,
             "optimizer.b2": 0.5, "model.tau": 0.3}
  with pytest.raises(checkpointing.CheckpointError) as e:
    train.train_and_evaluate(_run_config(small_synthetic_data, **changes), run)
  for line in ("model.contrastive_loss: 'negnce' -> 'infonce'",
               "optimizer.weight_decay: 0.05 -> 0.9", "optimizer.b2: 0.98 -> 0.5",
               "model.tau: 0.6 -> 0.3"):
    assert line in str(e.value), str(e.value)
  c = _run_config(small_synthetic_data, resume_allow_changes=",".join(changes), **changes)
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(c, run)   # resumed at step 8 of 8: nothing left to train
  warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  assert "model.tau: 0.6 -> 0.3" in warnings
  assert '"tau": 0.3' in open(os.path.join(run, "config_train.json")).read()


@pytest.mark.parametrize("key", ["model.textual_attention", "model.visual_attention"])
def test_evaluating_with_other_switches_is_an_error(finished_run, small_synthetic_data, tmp_path,
                                                    key):
  run = _copy(finished_run, tmp_path)
  before = snapshot(run)
  c = _run_config(small_synthetic_data, mode="eval", **{key: False})
  with pytest.raises(checkpointing.CheckpointError, match=rf"{key}: True -> False"):
    train.train_and_evaluate(c, run)
  assert snapshot(run) == before


def test_non_finite_parameters_are_never_saved(small_synthetic_data, tmp_path, monkeypatch):
  """A step that leaves NaN parameters with finite loss and gradients is caught at the save."""
  real = train.make_train_step

  def poisoning(setup, mesh, **kw):
    step = real(setup, mesh, **kw)

    def wrapped(state, batch):
      state, metrics = step(state, batch)
      if int(state["step"]) == 3:   # after the 3rd update, one parameter becomes NaN
        p = state["params"]["clip"]["visual"]["proj"]
        state["params"]["clip"]["visual"]["proj"] = p.at[0, 0].set(jnp.nan)
      return state, metrics
    return wrapped

  monkeypatch.setattr(train, "make_train_step", poisoning)
  # nan_policy="skip": the NaN loss after the poisoning skips updates instead of stopping, so only
  # the save can catch the NaN parameter.
  c = _run_config(small_synthetic_data, checkpoint_every=2, num_train_steps=6, nan_policy="skip")
  with pytest.raises(checkpointing.CheckpointError, match=r"step 4: non-finite .*clip/visual/proj"):
    train.train_and_evaluate(c, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_disk_full_run_ends_with_one_line_naming_the_workdir(small_synthetic_data, tmp_path):
  """`python -m tvr_jax.main` on a 20 MB tmpfs: step 4 fits (~15 MB), step 8 does not."""
  _require_tmpfs(tmp_path)
  workdir = tmp_path / "disk"
  workdir.mkdir()
  cmd = main_command("smoke", workdir, data_dir=small_synthetic_data, num_train_steps=8,
                     checkpoint_every=4, eval_max_examples=8, progress_bar=False)
  inner = " ".join(cmd) + f" ; echo rc=$? ; ls -a {workdir}/checkpoints"
  r = subprocess.run(_tmpfs_command("20m", str(workdir), inner), capture_output=True, text=True,
                     env=subprocess_env(small_synthetic_data), cwd=REPO_ROOT, timeout=600)
  assert "rc=1" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, r.stderr[-3000:]
  assert f"cannot write checkpoint step 8 into {workdir}/checkpoints: no space left" in errors[0]
  assert "MiB free of 20.0 MiB" in errors[0]
  listing = r.stdout.split("rc=1", 1)[1].split()
  assert sorted(listing) == [".", "..", "4"], listing   # no 8.orbax-checkpoint-tmp
