"""Two processes joined with jax.distributed (CPU, gloo collectives) train like one process.

Each process feeds only its half of every global batch (`jax.make_array_from_process_local_data`);
after a few steps of the synthetic config's tiny model the parameters must equal those of a single
process fed the same global batches. A second test runs the real `python -m tvr_jax.main` in two
processes (Grain sharding, gathered iterator states in the checkpoint, multi-host evaluation).
"""

import json
import socket
import subprocess
import sys

import numpy as np

from conftest import REPO_ROOT, main_command, subprocess_env

WORKER = r"""
import json, sys
import jax
data_dir, out, port = sys.argv[1], sys.argv[2], sys.argv[5]
n_proc, pid = int(sys.argv[3]), int(sys.argv[4])
if n_proc > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=n_proc,
                             process_id=pid)
import numpy as np
from configs import synthetic
from tvr_jax import sharding, train, tokenizer
from tvr_jax.data import VideoSplit, datasets

c = synthetic.get_config("smoke")
c.data_dir, c.batch_size = data_dir, 8
c.model.contrastive_loss = "infonce"   # smooth: compare to 1e-5 (see train_test)
c.optimizer.warmup_fraction, c.optimizer.eps, c.optimizer.groups = 0.0, 1.0, [(".*", 0.1)]
mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
state, setup = train.create_train_state(c, mesh, total_steps=10)
step = train.make_train_step(setup, mesh)
split = VideoSplit.open(datasets.dataset_dir(c), "train", progress=False)
local = c.batch_size // n_proc
losses = []
for k in range(3):
  rows = range(k * c.batch_size + pid * local, k * c.batch_size + (pid + 1) * local)  # my share
  frames, masks = zip(*(split.read_frames(j) for j in rows))
  local_batch = {"frames": np.stack(frames), "frame_mask": np.stack(masks),
                 "text_ids": tokenizer.tokenize([split.captions[j][0] for j in rows], c.max_words)}
  batch = {name: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), v,
                                                       (c.batch_size,) + v.shape[1:])
           for name, v in local_batch.items()}
  state, m = step(state, batch)
  losses.append(float(m["loss"]))
params = jax.tree.map(
    lambda x: np.asarray(jax.experimental.multihost_utils.process_allgather(x, tiled=True))
    if not x.is_fully_addressable else np.asarray(x), state["params"])
if pid == 0:
  np.savez(out, **{jax.tree_util.keystr(p): x
                   for p, x in jax.tree_util.tree_leaves_with_path(params)})
  print(json.dumps({"losses": losses, "devices": jax.device_count(),
                    "processes": jax.process_count()}))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(args, n_proc, data_dir):
  env = subprocess_env(data_dir)
  env.pop("XLA_FLAGS", None)   # one CPU device per process
  return [subprocess.Popen(args(pid), env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for pid in range(n_proc)]


def _wait(procs):
  """Outputs of started processes (fails the test on any error or timeout)."""
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, err[-4000:]
    outs.append((out, err))
  return outs


def _run(args, n_proc, data_dir):
  """Runs `n_proc` processes with `args(pid)`; returns their outputs."""
  return _wait(_start(args, n_proc, data_dir))


def test_two_processes_equal_one(small_synthetic_data, tmp_path):
  port = _free_port()
  # All three processes at once: XLA compiles on one core per process.
  two = _start(lambda pid: [sys.executable, "-c", WORKER, small_synthetic_data,
                            str(tmp_path / "two.npz"), "2", str(pid), str(port)],
               2, small_synthetic_data)
  one = _start(lambda pid: [sys.executable, "-c", WORKER, small_synthetic_data,
                            str(tmp_path / "one.npz"), "1", "0", "0"], 1, small_synthetic_data)
  two, one = _wait(two), _wait(one)
  info2 = json.loads(two[0][0].strip().splitlines()[-1])
  info1 = json.loads(one[0][0].strip().splitlines()[-1])
  assert info2["devices"] == 2 and info2["processes"] == 2 and info1["devices"] == 1
  np.testing.assert_allclose(info2["losses"], info1["losses"], rtol=1e-5)
  a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  assert a.files == b.files
  pa = np.concatenate([a[k].ravel() for k in a.files]).astype(np.float64)
  pb = np.concatenate([b[k].ravel() for k in a.files]).astype(np.float64)
  assert np.linalg.norm(pb - pa) / np.linalg.norm(pa) < 1e-5


def test_main_in_two_processes(small_synthetic_data, tmp_path):
  """`python -m tvr_jax.main` with --coordinator_address: trains, checkpoints, evaluates."""
  port = _free_port()
  workdir = tmp_path / "w"
  flags = dict(data_dir=small_synthetic_data, num_train_steps=2, eval_max_examples=8)

  def args(pid):
    return main_command("smoke", workdir, **flags) + [
        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}"]

  outs = _run(args, 2, small_synthetic_data)
  # Process 0 prints the run header; each process logs its own file (log.txt, log_p1.txt).
  assert "over 2 process(es)" in outs[0][0], outs[0][0][-2000:]
  assert (workdir / "log.txt").is_file() and (workdir / "log_p1.txt").is_file()
  report = json.loads((workdir / "eval_step_2.json").read_text())
  assert report["num_videos"] == 8 and "t2v/R@1" in report["metrics"]
  data = json.loads((workdir / "checkpoints" / "2" / "data" / "metadata").read_text())
  assert len(data["processes"]) == 2   # each process's Grain position
  states = [json.loads(s)["json"]["fingerprint"]["process_index"] for s in data["processes"]]
  assert states == [0, 1]
