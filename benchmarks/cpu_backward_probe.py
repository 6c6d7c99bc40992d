r"""CPU diagnostic: ViT-B/32 tower and one raw block, forward vs forward + backward, JAX vs torch.

  python -m benchmarks.cpu_backward_probe                    # JAX and PyTorch, ~3 min on 2 cores
  XLA_FLAGS=--xla_cpu_use_onednn=true python -m benchmarks.cpu_backward_probe --only jax

Times (median of --repeats after one warm-up, float32, threads = cores) the ViT-B/32 vision tower
on N images (48 = 4 clips x 12 frames, the quick train step's load), forward only and forward +
backward (gradients of all parameters), and one residual block (width 768, 50 tokens, batch N)
with `jax.nn.dot_product_attention` vs plain einsums, in JAX and PyTorch (PyTorch in a subprocess,
so the two thread pools do not interfere). The tower rows run the real `CLIP`; the block rows are a
hand-written block on [N, T, W] operands (the form that made XLA:CPU's backward slow before the
model switched to 2-D linear layers). Figures are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np

from benchmarks import common

W, T, HEADS = 768, 50, 12


def _block_weights(rng):
  shapes = dict(q=(W, W), k=(W, W), v=(W, W), o=(W, W), fc=(W, 4 * W), pr=(4 * W, W))
  return {k: (rng.standard_normal(s) * 0.02).astype(np.float32) for k, s in shapes.items()}


def probe_jax(n: int, repeats: int) -> list:
  """[(name, seconds)] for the JAX tower and block measurements."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from tvr_jax.models.clip import CLIP, CLIPConfig
  rng = np.random.default_rng(0)
  g, p = nnx.split(CLIP(CLIPConfig.preset("ViT-B/32"), rngs=nnx.Rngs(0)))
  x = jnp.asarray(rng.standard_normal((n, 224, 224, 3)).astype(np.float32))
  tower = lambda p, x: jnp.sum(nnx.merge(g, p).encode_image(x) ** 2)  # noqa: E731

  def attn_einsum(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)

  def block(w, x, attn):
    sp = lambda y: y.reshape(n, T, HEADS, W // HEADS)  # noqa: E731
    x = x + attn(sp(x @ w["q"]), sp(x @ w["k"]), sp(x @ w["v"])).reshape(n, T, W) @ w["o"]
    h = x @ w["fc"]
    return x + (h * jax.nn.sigmoid(1.702 * h)) @ w["pr"]

  ws = jax.tree.map(jnp.asarray, _block_weights(rng))
  xb = jnp.asarray(rng.standard_normal((n, T, W)).astype(np.float32))
  cases = [("tower fwd", jax.jit(tower), (p, x)),
           ("tower fwd+bwd", jax.jit(jax.grad(tower)), (p, x))]
  for name, attn in (("sdpa", jax.nn.dot_product_attention), ("einsum", attn_einsum)):
    loss = lambda w, x, attn=attn: jnp.sum(block(w, x, attn) ** 2)  # noqa: E731
    cases.append((f"block fwd+bwd ({name} attention)", jax.jit(jax.grad(loss)), (ws, xb)))
  out = []
  for name, f, args in cases:
    t = common.time_calls(lambda f=f, args=args: f(*args), repeats, 1, sync=jax.block_until_ready)
    out.append((name, t["median"]))
  return out


def probe_torch(n: int, repeats: int) -> list:
  """[(name, seconds)] for the PyTorch tower and block measurements (open_clip ViT-B/32)."""
  import torch
  from benchmarks import torch_reference
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  m = torch_reference.build_model("ViT-B/32", 224, 32)
  x = torch.randn(n, 3, 224, 224)
  ws = {k: torch.from_numpy(v).requires_grad_() for k, v in
        _block_weights(np.random.default_rng(0)).items()}
  xb = torch.randn(n, T, W)

  def tower_fwd():
    with torch.no_grad():
      return (m.encode_image(x) ** 2).sum()

  def tower_bwd():
    m.zero_grad(set_to_none=True)
    (m.encode_image(x) ** 2).sum().backward()

  def block_bwd():
    sp = lambda y: y.view(n, T, HEADS, W // HEADS).transpose(1, 2)  # noqa: E731
    a = torch.nn.functional.scaled_dot_product_attention(sp(xb @ ws["q"]), sp(xb @ ws["k"]),
                                                         sp(xb @ ws["v"]))
    y = xb + a.transpose(1, 2).reshape(n, T, W) @ ws["o"]
    h = y @ ws["fc"]
    ((y + (h * torch.sigmoid(1.702 * h)) @ ws["pr"]) ** 2).sum().backward()

  return [(name, common.time_calls(f, repeats, 1)["median"]) for name, f in
          (("tower fwd", tower_fwd), ("tower fwd+bwd", tower_bwd),
           ("block fwd+bwd (sdpa attention)", block_bwd))]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=48)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--only", choices=["jax", "torch"], default=None)
  args = p.parse_args(argv)
  if args.only == "torch":
    for name, s in probe_torch(args.images, args.repeats):
      print(f"torch\t{name}\t{s:.4f}")
    return
  jax_rows = probe_jax(args.images, args.repeats)
  torch_rows = {}
  if args.only is None:
    out = subprocess.run([sys.executable, "-m", "benchmarks.cpu_backward_probe", "--only", "torch",
                          "--images", str(args.images), "--repeats", str(args.repeats)],
                         capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    torch_rows = {line.split("\t")[1]: float(line.split("\t")[2])
                  for line in out.stdout.splitlines() if line.startswith("torch\t")}
  rows = [[name, f"{s:.3f}", f"{torch_rows[name]:.3f}" if name in torch_rows else "-",
           f"{s / torch_rows[name]:.2f}" if name in torch_rows else "-"] for name, s in jax_rows]
  print(f"machine: {common.machine()}; {common.today()}; {args.images} images, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  common.print_table(["measurement", "JAX s", "PyTorch s", "JAX/PyTorch"], rows)
  bwd = dict(jax_rows)
  print(f"summary: ViT-B/32 tower on {args.images} images: forward JAX/PyTorch "
        f"{bwd['tower fwd'] / torch_rows.get('tower fwd', np.nan):.2f}, forward+backward "
        f"{bwd['tower fwd+bwd'] / torch_rows.get('tower fwd+bwd', np.nan):.2f}")


if __name__ == "__main__":
  main()
