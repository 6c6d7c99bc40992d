"""Safe PyTorch readers: same tensors as torch's own loaders, and no code ever executed."""

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import REPO_ROOT

from tvr_jax import torch_io


@pytest.fixture()
def awkward_state_dict():
  """Tensors that exercise dtypes, strides, storage sharing and scalars."""
  import torch
  torch.manual_seed(0)
  base = torch.randn(6, 5)
  return {
      "f32": torch.randn(3, 4),
      "f16_transposed": torch.randn(4, 3).half().t(),   # non-contiguous
      "bf16": torch.randn(7).bfloat16(),
      "f64": torch.randn(2, 2, dtype=torch.float64),
      "i64_scalar": torch.tensor(224),
      "i32": torch.arange(5, dtype=torch.int32),
      "bool": torch.tensor([True, False, True]),
      "view_a": base[1:4],                             # shares storage with view_b, offset
      "view_b": base[:, 2],                            # strided view
      "empty": torch.zeros(0, 3),
  }


def _assert_same(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    ref = v.float().numpy() if str(v.dtype) == "torch.bfloat16" else v.numpy()
    g = got[k].astype(np.float32) if str(v.dtype) == "torch.bfloat16" else got[k]
    assert g.shape == ref.shape and g.dtype == ref.dtype, (k, g.dtype, ref.dtype)
    np.testing.assert_array_equal(g, ref, err_msg=k)


def test_zip_and_legacy_torch_save(awkward_state_dict, tmp_path):
  import torch
  torch.save(awkward_state_dict, tmp_path / "zip.pt")
  torch.save(awkward_state_dict, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
  for name, fmt in (("zip.pt", "torch-zip"), ("legacy.pt", "torch-legacy")):
    ck = torch_io.read_checkpoint(tmp_path / name)
    assert ck.format == fmt
    _assert_same(ck.tensors, awkward_state_dict)
  # Training checkpoints: {"state_dict": {"module.x": ...}, "epoch": 3}.
  torch.save({"state_dict": {"module." + k: v for k, v in awkward_state_dict.items()},
              "epoch": 3}, tmp_path / "train.pt")
  _assert_same(torch_io.read_checkpoint(tmp_path / "train.pt").tensors, awkward_state_dict)


def test_safetensors(tmp_path):
  import torch
  from safetensors.torch import save_file
  sd = {"a": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "h": torch.randn(5).half()}
  save_file(sd, tmp_path / "x.safetensors")
  ck = torch_io.read_checkpoint(tmp_path / "x.safetensors")
  assert ck.format == "safetensors"
  _assert_same(ck.tensors, sd)


def test_torchscript_matches_jit_state_dict(tmp_path):
  """Our TorchScript reader = torch.jit.load(...).state_dict(), without running the archive."""
  import torch

  class Inner(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.lin = torch.nn.Linear(3, 4)
      self.nobias = torch.nn.Linear(4, 2, bias=False)
      self.register_buffer("stat", torch.arange(4.0))

    def forward(self, x):
      return self.nobias(self.lin(x) + self.stat)

  class Outer(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.inner = Inner()
      self.blocks = torch.nn.ModuleList([torch.nn.LayerNorm(2) for _ in range(2)])
      self.scale = torch.nn.Parameter(torch.ones([]))
      self.plain = torch.ones(2)  # tensor attribute: neither parameter nor buffer
      self.sizes = [1, 2, 3]

    def forward(self, x):
      y = self.inner(x)
      for b in self.blocks:
        y = b(y)
      return y * self.scale + self.plain + len(self.sizes)

  for make in (torch.jit.script, lambda m: torch.jit.trace(m, torch.zeros(1, 3))):
    path = tmp_path / "ts.pt"
    make(Outer().eval()).save(path)
    ck = torch_io.read_checkpoint(path)
    assert ck.format == "torchscript"
    ref = torch.jit.load(path).state_dict()
    _assert_same(ck.tensors, dict(ref))
    assert "plain" not in ck.tensors and "inner.nobias.bias" not in ck.tensors


def _evil_payloads(marker):
  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  class EvilEval:
    def __reduce__(self):
      return (eval, (f"open({str(marker)!r}, 'w').close()",))
  return Evil, EvilEval


def test_hostile_pickles_do_not_run(tmp_path):
  import torch
  marker = tmp_path / "pwned"
  evil, evil_eval = _evil_payloads(marker)
  files = {}
  for name, cls in (("system", evil), ("eval", evil_eval)):
    torch.save({"w": torch.zeros(2), "x": cls()}, tmp_path / f"{name}.pt")
    files[f"{name}.pt"] = "posix.system" if name == "system" else r"(__builtin__|builtins)\.eval"
    with open(tmp_path / f"{name}.pkl", "wb") as f:
      pickle.dump(cls(), f)
    files[f"{name}.pkl"] = files[f"{name}.pt"]
  # A TorchScript-looking archive (code/ present, __torch__ classes allowed) with a payload.
  buf = io.BytesIO()
  pickle.dump(evil(), buf, protocol=2)
  with zipfile.ZipFile(tmp_path / "script.pt", "w") as z:
    z.writestr("script/data.pkl", buf.getvalue())
    z.writestr("script/code/__torch__/m.py", "class M(Module):\n  __parameters__ = []\n")
  files["script.pt"] = "posix.system"
  for name, global_name in files.items():
    with pytest.raises(torch_io.UnsafePickleError, match=global_name) as info:
      torch_io.read_checkpoint(tmp_path / name)
    assert name in str(info.value)
  assert not marker.exists()


def test_corrupt_and_foreign_files(tmp_path):
  import torch
  torch.save({"w": torch.randn(100)}, tmp_path / "good.pt")
  data = (tmp_path / "good.pt").read_bytes()
  (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 3])
  with pytest.raises(torch_io.CheckpointError, match="trunc.pt"):
    torch_io.read_checkpoint(tmp_path / "trunc.pt")
  # A storage shorter than its tensor needs: caught before any strided read.
  with zipfile.ZipFile(tmp_path / "good.pt") as src, \
      zipfile.ZipFile(tmp_path / "short.pt", "w") as dst:
    for item in src.namelist():
      payload = src.read(item)
      dst.writestr(item, payload[:40] if item.endswith("data/0") else payload)
  with pytest.raises(torch_io.CheckpointError, match="truncated"):
    torch_io.read_checkpoint(tmp_path / "short.pt")
  (tmp_path / "text.bin").write_text("hello")
  with pytest.raises(torch_io.CheckpointError, match="unrecognised file"):
    torch_io.read_checkpoint(tmp_path / "text.bin")
  with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
    z.writestr("readme.txt", "x")
  with pytest.raises(torch_io.CheckpointError, match="not a PyTorch checkpoint"):
    torch_io.read_checkpoint(tmp_path / "other.zip")
  with pytest.raises(FileNotFoundError):
    torch_io.read_checkpoint(tmp_path / "absent.pt")
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "clip"}))
  with pytest.raises(torch_io.CheckpointError, match="without model.safetensors"):
    torch_io.read_checkpoint(tmp_path / "hf")
  (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
  with pytest.raises(torch_io.CheckpointError, match="bad.safetensors"):
    torch_io.read_checkpoint(tmp_path / "bad.safetensors")


def test_reading_and_converting_never_import_torch(tmp_path):
  import torch
  torch.save({"w": torch.randn(3)}, tmp_path / "w.pt")
  code = (f"import sys; import tvr_jax.torch_io as t, tvr_jax.convert, tvr_jax.checkpointing, "
          f"tvr_jax.models.clip; ck = t.read_checkpoint({str(tmp_path / 'w.pt')!r}); "
          f"assert ck.tensors['w'].shape == (3,); "
          f"assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=300)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
