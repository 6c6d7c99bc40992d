"""Tests for tvr_jax.train: sharded step equivalence, one-step end-to-end, exact resume,
NaN handling, and the synthetic config's learning check.

The small synthetic dataset (`small_synthetic_data`, 64 train / 32 test clips, tests/conftest.py)
is built once per session and shared with main_test.py and multihost_test.py.
"""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, main_command, smoke_config, subprocess_env
from configs import synthetic as synthetic_config
from tvr_jax import checkpointing, sharding
from tvr_jax import train
from tvr_jax.data import datasets


# --------------------------------------------------------------------------------------------------
@pytest.mark.devices(8)
def test_sharded_step_equals_single_device(tmp_path):
  """8 devices (batch over data=2 x fsdp=4, parameters FSDP over 4) == 1 device, one step.

  The objective is InfoNCE + TPM-CL over the global batch (see the code for why not NegNCE); Adam's
  epsilon is raised so that the first update is linear in the gradient instead of +-lr.
  """
  c = synthetic_config.get_config("smoke")
  c.clip_preset, c.image_size, c.num_frames, c.max_words = "tiny", 32, 4, 16
  c.batch_size, c.min_fsdp_size = 8, 512
  # Global-batch InfoNCE + full TPM-CL: NegNCE's hard-negative set (S_ij > S_ii, margin 0) and its
  # probability clip are discontinuous, so its gradients move ~1e-4 under mere float reordering
  # (even a permuted batch on one device); InfoNCE exercises the same global-batch similarity.
  c.model.contrastive_loss, c.model.partial_type = "infonce", 4
  c.optimizer.warmup_fraction = 0.0   # the first step already moves the parameters
  # Adam's first step is lr * g / (|g| + eps): with the tiny default eps it maps gradients of
  # ~1e-9 (rounding noise) to +-lr, so compare with an eps that keeps the update linear in g.
  c.optimizer.eps = 1.0
  c.optimizer.groups = [(".*", 1.0)]   # a large step: moves the weights ~4% (eps=1 damps it)
  rng = np.random.default_rng(0)
  ids = np.zeros((8, 16), np.int32)
  ids[:, 0] = 49406
  ids[:, 1:6] = rng.integers(1, 5000, (8, 5))
  ids[:, 6] = 49407
  batch = {"frames": rng.integers(0, 256, (8, 4, 32, 32, 3), dtype=np.uint8),
           "frame_mask": np.array([[1, 1, 1, 1]] * 6 + [[1, 1, 0, 0]] * 2, np.int32),
           "text_ids": ids}
  res = {}
  for name, mesh_cfg, devices in [("one", {"data": 1, "fsdp": 1}, jax.devices()[:1]),
                                  ("eight", {"data": 2, "fsdp": 4}, jax.devices())]:
    mesh = sharding.make_mesh(mesh_cfg, devices=devices)
    state, setup = train.create_train_state(c, mesh, total_steps=10)
    if name == "one":
      np.savez(tmp_path / "init.npz", **{jax.tree_util.keystr(p): np.asarray(x) for p, x in
                                         jax.tree_util.tree_leaves_with_path(state["params"])})
    step = train.make_train_step(setup, mesh)
    b = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
    losses = []
    for _ in range(1):
      state, m = step(state, b)
      losses.append(float(m["loss"]))
    specs = [str(x.sharding.spec) for x in jax.tree.leaves(state["params"])]
    flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in
            jax.tree_util.tree_leaves_with_path(state["params"])}
    np.savez(tmp_path / f"{name}.npz", **flat)
    res[name] = {"losses": losses, "fsdp_leaves": sum("fsdp" in s for s in specs),
                     "n_devices": len(jax.tree.leaves(state["params"])[0].sharding.device_set)}
  assert res["eight"]["fsdp_leaves"] > 10 and res["one"]["fsdp_leaves"] == 0
  assert res["eight"]["n_devices"] == 8
  np.testing.assert_allclose(res["eight"]["losses"], res["one"]["losses"], rtol=1e-5)
  init = np.load(tmp_path / "init.npz")
  one, eight = np.load(tmp_path / "one.npz"), np.load(tmp_path / "eight.npz")
  assert one.files == eight.files == init.files
  flat = lambda d: np.concatenate([d[k].ravel().astype(np.float64) for k in one.files])  # noqa: E731
  p0, p1, p8 = flat(init), flat(one), flat(eight)
  assert np.linalg.norm(p1 - p0) > 1e-2 * np.linalg.norm(p0)          # the step moved them
  # Parameters after the step agree within 1e-5 relative ...
  assert np.linalg.norm(p8 - p1) / np.linalg.norm(p1) < 1e-5
  # ... and so do the updates themselves, to float32 reduction-order noise.
  assert np.linalg.norm((p8 - p0) - (p1 - p0)) / np.linalg.norm(p1 - p0) < 1e-4


def test_train_and_evaluate_one_step(small_synthetic_data, tmp_path):
  """The real train_and_evaluate for one step: checkpoint, eval JSON, TensorBoard."""
  c = smoke_config(small_synthetic_data, num_train_steps=1, checkpoint_every=1,
                   eval_max_examples=16)
  metrics = train.train_and_evaluate(c, str(tmp_path))
  assert 0.0 <= metrics["t2v/R@1"] <= 100.0 and "dsl/t2v/R@1" in metrics and "v2t/MnR" in metrics
  report = json.loads((tmp_path / "eval_step_1.json").read_text())
  assert report["metrics"] == metrics and report["num_videos"] == 16
  assert report["protocol"].startswith("multi-caption")
  mgr = checkpointing.TrainCheckpointManager(tmp_path / "checkpoints")
  assert mgr.all_steps() == [1]
  assert mgr._manager.metrics(1)["t2v/R@1"] == pytest.approx(metrics["t2v/R@1"])
  mgr.close()
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tensorboard"))


def _read_final(workdir, step):
  state = checkpointing.restore_pytree(os.path.join(workdir, "checkpoints", str(step), "state"))
  report = json.loads(open(os.path.join(workdir, f"eval_step_{step}.json")).read())
  return state, report["metrics"]


def test_sigkill_and_resume_is_bit_identical(small_synthetic_data, tmp_path):
  """Kill -9 mid-run, rerun the same command: same parameters, optimizer state and metrics."""
  steps = 40   # enough steps after the kill point that the run cannot finish before the kill
  flags = dict(data_dir=small_synthetic_data, num_train_steps=steps, checkpoint_every=4,
               eval_max_examples=16, progress_bar=False)
  ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
  ref = subprocess.Popen(main_command("smoke", ref_dir, **flags),
                         env=subprocess_env(small_synthetic_data), cwd=REPO_ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  proc = subprocess.Popen(main_command("smoke", run_dir, **flags),
                          env=subprocess_env(small_synthetic_data), cwd=REPO_ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = run_dir / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if ckpt_dir.is_dir() and any(n.isdigit() and int(n) >= 8 for n in os.listdir(ckpt_dir)):
      break
    time.sleep(0.01)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  assert killed_at and max(killed_at) < steps
  resumed = subprocess.run(main_command("smoke", run_dir, **flags),
                           env=subprocess_env(small_synthetic_data), cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  # the console line
  assert f"resuming from checkpoint {ckpt_dir}/{max(killed_at)}" in resumed.stdout
  _, ref_err = ref.communicate(timeout=300)
  assert ref.returncode == 0, ref_err[-3000:]
  ref_state, ref_metrics = _read_final(ref_dir, steps)
  state, metrics = _read_final(run_dir, steps)
  assert metrics == ref_metrics
  ref_flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(ref_state)}
  flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(state)}
  assert flat.keys() == ref_flat.keys()
  for key in flat:
    np.testing.assert_array_equal(flat[key], ref_flat[key], err_msg=key)   # bit-identical


def test_nan_loss_stops_with_step_and_saves_nothing(small_synthetic_data, tmp_path):
  c = smoke_config(small_synthetic_data, num_train_steps=6, checkpoint_every=1, log_every=3)
  c.optimizer.groups = [(".*", 1e30)]   # step 0 (lr 0) is fine, step 1 blows the weights up
  c.optimizer.grad_clip_norm = 0.0
  with pytest.raises(train.NonFiniteLossError,
                     match=r"non-finite loss or gradient at step \d") as e:
    train.train_and_evaluate(c, str(tmp_path))
  first_bad = int(str(e.value).split("at step ")[1].split()[0])
  assert 1 <= first_bad < 6
  saved = checkpointing.TrainCheckpointManager(tmp_path / "checkpoints").all_steps()
  # Every checkpoint follows a finiteness check: none holds the result of the bad step.
  assert all(s <= first_bad for s in saved), (saved, first_bad)


def test_nan_skip_policy_keeps_parameters():
  """nan_policy='skip': a non-finite step leaves parameters and optimizer state unchanged."""
  c = synthetic_config.get_config("smoke")
  c.clip_preset, c.image_size, c.num_frames, c.max_words, c.batch_size = "tiny", 32, 4, 16, 4
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1})
  state, setup = train.create_train_state(c, mesh, total_steps=10)
  step = train.make_train_step(setup, mesh, nan_policy="skip")
  rng = np.random.default_rng(0)
  ids = np.zeros((4, 16), np.int32)
  ids[:, 0], ids[:, 1:4], ids[:, 4] = 49406, rng.integers(1, 999, (4, 3)), 49407
  batch = {"frames": rng.integers(0, 256, (4, 4, 32, 32, 3), dtype=np.uint8),
           "frame_mask": np.ones((4, 4), np.int32), "text_ids": ids}
  state, m = step(state, batch)
  assert int(m["skipped"]) == 0
  # Poison one weight: loss and gradients become NaN.
  state["params"]["clip"]["visual"]["proj"] = state["params"]["clip"]["visual"]["proj"] * np.nan
  before = jax.tree.map(np.asarray, {"opt": state["opt_state"], "p": state["params"]})
  state, m = step(state, batch)
  assert int(m["skipped"]) == 1 and int(state["first_nonfinite"]) == 1 and int(state["step"]) == 2
  after = jax.tree.map(np.asarray, {"opt": state["opt_state"], "p": state["params"]})
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), before, after)


@pytest.fixture(scope="session")
def default_synthetic_data(tmp_path_factory):
  """The synthetic config's own dataset (default SyntheticConfig), built as the config would."""
  c = synthetic_config.get_config("test")
  c.data_dir = str(tmp_path_factory.mktemp("synthetic_default") / "tfds")
  datasets.check_inputs(c)   # build_if_missing: builds it exactly as a first run does
  return c.data_dir


def test_synthetic_config_learns(default_synthetic_data, tmp_path):
  """configs/synthetic.py:test reaches text->video R@1 >= 5x chance on its test split."""
  c = synthetic_config.get_config("test")
  c.data_dir = default_synthetic_data
  t0 = time.time()
  metrics = train.train_and_evaluate(c, str(tmp_path))
  (path,) = [p for p in os.listdir(tmp_path) if p.startswith("eval_step_")]
  report = json.loads((tmp_path / path).read_text())
  chance = 100.0 / report["num_videos"]
  print(f"synthetic:test {time.time() - t0:.0f}s, t2v/R@1={metrics['t2v/R@1']:.2f} "
        f"(chance {chance:.2f}), v2t/R@1={metrics['v2t/R@1']:.2f}")
  assert report["num_videos"] == 256
  assert metrics["t2v/R@1"] >= 5 * chance


def test_sigterm_saves_and_exits_cleanly(small_synthetic_data, tmp_path):
  """SIGTERM (preemption): the run checkpoints the step it is on and exits 0."""
  flags = dict(data_dir=small_synthetic_data, num_train_steps=400, checkpoint_every=4,
               eval_max_examples=8, progress_bar=False)
  proc = subprocess.Popen(main_command("smoke", tmp_path, **flags),
                          env=subprocess_env(small_synthetic_data), cwd=REPO_ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  ckpt_dir = tmp_path / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if ckpt_dir.is_dir() and any(n.isdigit() for n in os.listdir(ckpt_dir)):
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  del out
  log = (tmp_path / "log.txt").read_text()   # the console line is logged there too
  stopped = int(log.split("stopping at step ")[1].split()[0])
  assert 4 <= stopped < 400
  mgr = checkpointing.TrainCheckpointManager(ckpt_dir)
  assert mgr.latest_step() == stopped   # saved at the step it stopped on, not only every 4
  mgr.close()
