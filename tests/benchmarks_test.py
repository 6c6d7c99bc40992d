"""Smoke tests of the benchmarks: the smallest mode of each runs and prints its summary line.

Also checks the pieces whose errors would silently skew a figure: the analytic FLOP count against
a brute-force sum over the layers, the meanP baseline's similarity against a NumPy reference, and
the PyTorch reference step's loss against a hand computation.
"""

import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT


def _run(*args, timeout=240):
  out = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=timeout, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_train_step_tiny_prints_table_and_summary():
  out = _run("-m", "benchmarks.train_step", "--tiny")
  summary = [line for line in out.splitlines() if line.startswith("summary: ")]
  assert len(summary) == 1, out
  assert "tiny-64 dmae float32" in summary[0] and "tiny-64 meanP float32" in summary[0]
  assert "JAX/torch" in summary[0]
  rows = [line.split() for line in out.splitlines() if line.startswith("tiny-64")]
  assert len(rows) == 3  # dmae, meanP, torch
  for r in rows:
    assert float(r[-3]) > 0  # torch seconds
  # The CPU roofline: both matmul rates measured, each step set against its floor.
  roof = [line for line in out.splitlines() if line.startswith("matmul roofline")]
  assert len(roof) == 1 and "JAX" in roof[0] and "PyTorch" in roof[0], out
  rates = [float(w) for w in roof[0].replace(",", " ").split() if w.replace(".", "").isdigit()]
  assert len(rates) == 2 and min(rates) > 0, roof
  assert sum("x floor" in line for line in out.splitlines()) == 3  # dmae, meanP, torch


def test_evaluate_tiny_prints_summary():
  out = _run("-m", "benchmarks.evaluate", "--tiny")
  summary = [line for line in out.splitlines() if line.startswith("summary: ")]
  assert len(summary) == 1, out
  assert "extrapolated from 4" in out  # 4 of 50 videos encoded, scaled up
  # --tiny simulates 2 devices: the total is also given with the scorer sharded over them.
  assert "with the scorer sharded over 2 devices" in summary[0], summary


def test_tower_flops_matches_layer_by_layer_count():
  from benchmarks import train_step
  from tvr_jax.models.clip import CLIPConfig
  cc = CLIPConfig.preset("ViT-B/32")
  b, f, w = 3, 12, 32
  total = 0
  t = 7 * 7 + 1
  for _ in range(12):  # vision layers: q, k, v, out projections, MLP up/down, QK^T and AV
    total += 4 * 2 * t * 768 * 768 + 2 * 2 * t * 768 * 3072 + 2 * 2 * t * t * 768
  total += 2 * 49 * (3 * 32 * 32) * 768 + 2 * 768 * 512
  text = 0
  for _ in range(12):
    text += 4 * 2 * w * 512 * 512 + 2 * 2 * w * 512 * 2048 + 2 * 2 * w * w * 512
  text += 2 * 512 * 512
  assert train_step.tower_flops(cc, b, f, w) == pytest.approx(3 * (b * f * total + b * text))
  # ViT-B/32 forward is ~4.4 GMACs = ~8.8 GFLOP per 224 px image (as commonly quoted).
  assert 8.4e9 < total < 9.2e9


def test_torch_reference_loss_matches_hand_computation():
  import torch
  from benchmarks import torch_reference
  torch.manual_seed(0)
  model = torch_reference.build_model("tiny", 32, 8)
  step = torch_reference.MeanPStep(model)
  frames, fmask, ids = torch_reference.random_batch(3, 2, 32, 8)
  fmask[1, 1] = 0
  with torch.no_grad():
    got = float(step.loss(frames, fmask, ids))
    x = frames.float().permute(0, 1, 4, 2, 3) / 255.0
    x = (x - step.mean[None]) / step.std[None]
    feats = torch.stack([torch.stack([model.encode_image(x[b, f:f + 1])[0] for f in range(2)])
                         for b in range(3)])
    feats = feats / feats.norm(dim=-1, keepdim=True)
    video = torch.stack([feats[b][fmask[b] > 0].mean(0) for b in range(3)])
    video = video / video.norm(dim=-1, keepdim=True)
    text = model.encode_text(ids)
    text = text / text.norm(dim=-1, keepdim=True)
    logits = (model.logit_scale.exp() * text @ video.T).numpy().astype(np.float64)
  def ce(z):
    z = z - z.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - np.diag(z)))
  assert got == pytest.approx(0.5 * (ce(logits) + ce(logits.T)), rel=1e-4)
  before = [p.detach().clone() for p in model.parameters()]
  loss = step((frames, fmask, ids))
  assert np.isfinite(loss)
  assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
