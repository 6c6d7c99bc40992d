"""Shared test set-up.

JAX reads its flags when it first initialises, so everything here runs before any test module
imports JAX. The default test process sees ONE CPU device (8 simulated devices make unsharded work
about 1.8x slower on 2 cores); tests that need several devices run code in a subprocess through
`run_with_devices`.
"""

import os
import subprocess
import sys
import textwrap

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


def run_with_devices(code: str, n_devices: int = 8, timeout: int = 600, env=None) -> str:
  """Runs `code` in a fresh Python with `n_devices` simulated CPU devices; returns its stdout.

  Fails the calling test with the child's stderr if the child exits non-zero.
  """
  child_env = dict(os.environ)
  child_env["XLA_FLAGS"] = (child_env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={n_devices}")
  child_env["JAX_PLATFORMS"] = "cpu"
  child_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + child_env.get("PYTHONPATH", "")
  if env:
    child_env.update(env)
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                        text=True, timeout=timeout, env=child_env, cwd=REPO_ROOT)
  if proc.returncode != 0:
    pytest.fail(f"subprocess failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n"
                f"{proc.stderr[-8000:]}")
  return proc.stdout


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
