"""Shared test set-up.

JAX reads its flags when it first initialises, so everything here runs before any test module
imports JAX. The default test process sees ONE CPU device (8 simulated devices make unsharded work
about 1.8x slower on 2 cores). A test marked `@pytest.mark.devices(n)` is an ordinary test function
that the parent process re-runs as `pytest <file>::<test>` in a child that sees n simulated CPU
devices (see `pytest_pyfunc_call`); the child runs its body for real.

Also here: the session's small synthetic dataset and the helpers of the tests that train on it
(`smoke_config`, `main_command`, `subprocess_env`), so that no test file imports another.
"""

import json
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared")
GOLDEN_ENV = "TVR_GOLDEN_FILE"


def golden_file_path() -> str:
  """The golden reference file: $TVR_GOLDEN_FILE, else shared/golden/dmae_reference.npz in the
  directory that holds the repository (where CI's fresh clone finds the reference material)."""
  return os.environ.get(GOLDEN_ENV) or os.path.join(SHARED_DIR, "golden", "dmae_reference.npz")


def require_golden_file(path: str) -> str:
  """`path` if the file exists; otherwise skips the calling test, or fails it when `CI` is set
  (a CI run must never pass by skipping the golden comparison)."""
  if os.path.isfile(path):
    return path
  message = f"golden reference file {path} not found; set {GOLDEN_ENV} to its path"
  if os.environ.get("CI"):
    pytest.fail(f"{message} (CI={os.environ['CI']!r}: a missing reference fails the run)",
                pytrace=False)
  pytest.skip(message)


@pytest.fixture(scope="session")
def golden_file() -> str:
  """Path of the golden reference file (see `golden_file_path`, `require_golden_file`)."""
  return require_golden_file(golden_file_path())


def import_open_clip():
  """Imports open_clip beside CPU torch.

  The index's torchvision is a CUDA build whose import fails next to CPU torch
  (`operator torchvision::nms does not exist`); declaring the two operator schemas first makes it
  import. CLIP never calls them.
  """
  import torch
  if not getattr(import_open_clip, "_patched", False):
    try:
      lib = torch.library.Library("torchvision", "DEF")
      lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
      lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
      import_open_clip._lib = lib  # keep the registration alive
    except RuntimeError:
      pass  # already defined (torchvision imported cleanly or another caller did this)
    import_open_clip._patched = True
  import open_clip
  return open_clip


DEVICES_ENV = "TVR_TEST_DEVICES"          # set in the child: the device count it was started with
FUNCARGS_ENV = "TVR_TEST_FUNCARGS"        # the parent's path-valued fixture values, as JSON


def pytest_configure(config: pytest.Config) -> None:
  config.addinivalue_line(
      "markers", "devices(n): run this test in a child pytest that sees n simulated CPU devices")


def _device_count(item: pytest.Item) -> int | None:
  """n of the item's `devices(n)` marker, None when it has none."""
  marker = item.get_closest_marker("devices")
  if marker is None:
    return None
  if len(marker.args) != 1 or not isinstance(marker.args[0], int) or marker.args[0] < 1:
    raise pytest.UsageError(f"{item.nodeid}: use @pytest.mark.devices(n) with an int n >= 1, "
                            f"not devices{marker.args}")
  return marker.args[0]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
  """In the child: check the device count and reuse the parent's path-valued fixtures.

  A fixture value already in `item.funcargs` is not set up again, so the child does not rebuild
  datasets the parent built (it receives str and path fixture values only).
  """
  n = _device_count(item)
  if n is None or DEVICES_ENV not in os.environ:
    return
  import jax
  if jax.device_count() != n:
    pytest.fail(f"{item.nodeid}: the child sees {jax.device_count()} devices, not {n} "
                f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})", pytrace=False)
  for name, (kind, value) in json.loads(os.environ.get(FUNCARGS_ENV, "{}")).items():
    if name in item.fixturenames:
      item.funcargs[name] = pathlib.Path(value) if kind == "path" else value


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
  """In the parent: runs a `devices(n)` test as `pytest <nodeid>` with n simulated CPU devices.

  JAX fixes its device count when it first initialises, so the default process (one device)
  cannot run it itself. The child's output comes back in the failure message. The time limit is
  generous: the 8-device train step took 10 min under a load average of 50 on 2 cores.
  """
  n = _device_count(pyfuncitem)
  if n is None or DEVICES_ENV in os.environ:
    return None   # an unmarked test, or the child: pytest calls the function
  funcargs = {}
  for name, value in pyfuncitem.funcargs.items():
    if isinstance(value, str):
      funcargs[name] = ("str", value)
    elif isinstance(value, os.PathLike):
      funcargs[name] = ("path", os.fspath(value))
  env = dict(os.environ, JAX_PLATFORMS="cpu", **{DEVICES_ENV: str(n),
                                                  FUNCARGS_ENV: json.dumps(funcargs)})
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={n}").strip()
  rootdir = str(pyfuncitem.config.rootpath)
  cmd = [sys.executable, "-m", "pytest", pyfuncitem.nodeid, "-q", "-p", "no:cacheprovider",
         "--rootdir", rootdir]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=rootdir,
                        timeout=1200)
  lines = proc.stdout.strip().splitlines() or [""]
  if proc.returncode == 0 and " skipped" in lines[-1] and " passed" not in lines[-1]:
    reasons = [line.split(": ", 1)[-1] for line in lines if line.startswith("SKIPPED")]
    pytest.skip(f"in the child on {n} devices: {'; '.join(reasons) or lines[-1]}")
  if proc.returncode != 0 or " passed" not in lines[-1]:
    pytest.fail(f"{pyfuncitem.nodeid} on {n} simulated devices (rc={proc.returncode}): "
                f"{' '.join(cmd)}\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}", pytrace=False)
  return True


def make_ids(n: int, length: int, seed: int, dtype=np.int32) -> np.ndarray:
  """OpenAI-style token ids: SOT, random BPE ids, EOT (49407, the largest id), zero padding."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((n, length), dtype)
  for i in range(n):
    k = int(rng.integers(1, length - 1))
    ids[i, 0] = 49406
    ids[i, 1:k + 1] = rng.integers(1, 49406, k)
    ids[i, k + 1] = 49407
  return ids


def build_synthetic(root: str, **sizes) -> str:
  """Renders a raw synthetic tree of `sizes` and builds it as TFDS under root/tfds; returns that."""
  from data_prep import build as build_lib
  from data_prep.synthetic import generate
  raw = os.path.join(root, "raw")
  generate.write_raw(generate.SyntheticConfig(**sizes), raw, progress=False)
  data_dir = os.path.join(root, "tfds")
  build_lib.build("synthetic", raw, data_dir, workers=1, progress=False)
  return data_dir


@pytest.fixture(scope="session")
def small_synthetic_data(tmp_path_factory) -> str:
  """TFDS data_dir of a small synthetic set (64 train, 8 val, 32 test clips; 8 frames x 64 px)."""
  return build_synthetic(str(tmp_path_factory.mktemp("synthetic_small")), num_train=64, num_val=8,
                         num_test=32)


def smoke_config(data_dir: str, **overrides):
  """configs/synthetic.py:smoke on `data_dir` with `overrides` (dotted keys allowed)."""
  from configs import synthetic as synthetic_config
  c = synthetic_config.get_config("smoke")
  c.data_dir = data_dir
  c.progress_bar = False
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


def main_command(config_arg: str, workdir, **overrides) -> list[str]:
  """The `python -m tvr_jax.main` command line for `configs/synthetic.py:<config_arg>`."""
  cmd = [sys.executable, "-m", "tvr_jax.main", f"--config=configs/synthetic.py:{config_arg}",
         f"--workdir={workdir}"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  return cmd


def subprocess_env(data_dir: str) -> dict[str, str]:
  """Environment of the `python -m tvr_jax.main` subprocesses: CPU, and a persistent compilation
  cache beside the session's data so runs of the same config compile once."""
  return dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu",
              JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.dirname(data_dir), "jit_cache"))
