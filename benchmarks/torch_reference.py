r"""PyTorch reference train step: CLIP4Clip meanP + symmetric InfoNCE + AdamW on open_clip towers.

    python -m benchmarks.torch_reference --clip ViT-B/32 --batch_size 4 --frames 12

What one step does (CLIP4Clip's `meanP` recipe, random init, `quick_gelu` as OpenAI CLIP):
  frames uint8 [B, F, H, W, 3] -> float, CLIP-normalised, NCHW -> encode_image on B*F images ->
  L2-normalise per frame -> masked mean over frames -> L2-normalise (video [B, D]);
  ids [B, L] -> encode_text (EOT token) -> L2-normalise (text [B, D]);
  logits = exp(logit_scale) * text @ video.T; loss = (CE(logits) + CE(logits.T)) / 2;
  backward; clip_grad_norm_(1.0); AdamW (betas 0.9/0.98, eps 1e-6, weight decay 0.2).
The text tower is built with context length L (CLIP4Clip uses 32 positions), as the JAX model is.
`benchmarks/train_step.py` runs this script in a subprocess (`--json`) to time the same shapes side
by side: in one process with JAX, torch's OpenMP threads and XLA's thread pool slow each other down
(a tiny step took 0.9 s instead of 0.04 s), which would not be a fair comparison.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from benchmarks import common

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# open_clip model names of the presets the JAX side knows ("tiny" matches CLIPConfig.preset).
OPEN_CLIP_NAMES = {"ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16"}


def import_open_clip():
  """open_clip beside CPU torch (the workaround of tests/conftest.py, imported from there)."""
  from tests.conftest import import_open_clip as imp
  return imp()


def build_model(clip: str, image_size: int, context_length: int):
  """An open_clip CLIP with random weights, QuickGELU and `context_length` text positions.

  Args:
    clip: "ViT-B/32", "ViT-B/16" or "tiny" (the JAX tests' tiny sizes, for smoke tests).
    image_size: input resolution.
    context_length: L, text positions (the JAX step's max_words).
  """
  open_clip = import_open_clip()
  if clip == "tiny":
    cfg = dict(embed_dim=32, vision_cfg=dict(image_size=image_size, layers=2, width=64,
                                              patch_size=16, head_width=32),
               text_cfg=dict(context_length=context_length, vocab_size=49408, width=64, heads=2,
                             layers=2))
  elif clip in OPEN_CLIP_NAMES:
    cfg = open_clip.get_model_config(OPEN_CLIP_NAMES[clip])
    cfg = dict(cfg, vision_cfg=dict(cfg["vision_cfg"], image_size=image_size),
               text_cfg=dict(cfg["text_cfg"], context_length=context_length))
  else:
    raise ValueError(f"unknown clip {clip!r}; known: {sorted(OPEN_CLIP_NAMES) + ['tiny']}")
  return open_clip.CLIP(**cfg, quick_gelu=True)


class MeanPStep:
  """One CLIP4Clip meanP + InfoNCE + AdamW update; `__call__(batch)` returns the loss (float)."""

  def __init__(self, model, lr: float = 1e-7, weight_decay: float = 0.2):
    import torch
    self.torch = torch
    self.model = model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=lr, betas=(0.9, 0.98), eps=1e-6)
    self.mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    self.std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

  def loss(self, frames, frame_mask, ids):
    """frames uint8 [B, F, H, W, 3], frame_mask [B, F], ids int64 [B, L] -> scalar loss."""
    torch, f = self.torch, self.torch.nn.functional
    b, nf = frames.shape[:2]
    x = frames.reshape(b * nf, *frames.shape[2:]).permute(0, 3, 1, 2).float() / 255.0
    x = (x - self.mean) / self.std
    video = f.normalize(self.model.encode_image(x).view(b, nf, -1), dim=-1)
    m = frame_mask.to(video.dtype).unsqueeze(-1)
    video = f.normalize((video * m).sum(1) / m.sum(1).clamp(min=1.0), dim=-1)
    text = f.normalize(self.model.encode_text(ids), dim=-1)
    logits = self.model.logit_scale.exp() * text @ video.t()
    labels = torch.arange(b)
    return 0.5 * (f.cross_entropy(logits, labels) + f.cross_entropy(logits.t(), labels))

  def __call__(self, batch) -> float:
    self.opt.zero_grad(set_to_none=True)
    loss = self.loss(*batch)
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    return float(loss.detach())


def random_batch(batch_size: int, frames: int, image_size: int, max_words: int, seed: int = 0):
  """(frames uint8 [B, F, H, W, 3], frame_mask [B, F], ids int64 [B, L]) as torch tensors."""
  import torch
  rng = np.random.default_rng(seed)
  ids = np.zeros((batch_size, max_words), np.int64)
  ids[:, 0] = 49406
  n = max_words // 2
  ids[:, 1:n] = rng.integers(1, 49000, (batch_size, n - 1))
  ids[:, n] = 49407
  fr = rng.integers(0, 256, (batch_size, frames, image_size, image_size, 3), dtype=np.uint8)
  return (torch.from_numpy(fr), torch.ones(batch_size, frames, dtype=torch.int64),
          torch.from_numpy(ids))


def time_step(clip: str, batch_size: int, frames: int, image_size: int, max_words: int,
              repeats: int = 3, warmup: int = 1, threads: int | None = None) -> dict:
  """Times the PyTorch meanP step (float32, CPU); returns `common.time_calls`'s dict plus info.

  Args:
    threads: torch intra-op threads (default: all cores, as XLA's CPU backend uses).
  """
  import torch
  torch.set_num_threads(threads or os.cpu_count() or 1)
  torch.manual_seed(0)
  model = build_model(clip, image_size, max_words)
  step = MeanPStep(model)
  batch = random_batch(batch_size, frames, image_size, max_words)
  losses = []
  t = common.time_calls(lambda: losses.append(step(batch)), repeats, warmup)
  t.update(loss=losses[-1], threads=torch.get_num_threads(), torch=torch.__version__,
           params=sum(p.numel() for p in model.parameters()))
  return t


def matmul_gflops(m: int, k: int, n: int, repeats: int = 10) -> float:
  """GFLOP/s of one float32 [m, k] @ [k, n] matmul in torch (median of `repeats` after 1 warm-up).

  The CPU step is nearly all such matmuls, so this rate over the step's FLOPs is its floor.
  """
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  a, b = torch.randn(m, k), torch.randn(k, n)
  return 2e-9 * m * k * n / common.time_calls(lambda: a @ b, repeats, 1)["median"]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--clip", default="ViT-B/32", choices=sorted(OPEN_CLIP_NAMES) + ["tiny"])
  p.add_argument("--batch_size", type=int, default=4)
  p.add_argument("--frames", type=int, default=12)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--max_words", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
  p.add_argument("--matmul", default="", help="M,K,N: also time a float32 [M,K] @ [K,N] matmul")
  args = p.parse_args(argv)
  t = time_step(args.clip, args.batch_size, args.frames, args.image_size, args.max_words,
                args.repeats, args.warmup)
  if args.matmul:
    t["matmul_gflops"] = matmul_gflops(*(int(v) for v in args.matmul.split(",")))
  if args.json:
    print("json: " + json.dumps({k: v for k, v in t.items()}))
  print(f"torch {t['torch']} ({t['threads']} threads), {args.clip}, "
        f"{t['params'] / 1e6:.1f}M params, "
        f"batch {args.batch_size} x {args.frames} x {args.image_size}px, L={args.max_words}")
  print(f"summary: step {t['median']:.3f} s median of {t['n']} (min {t['min']:.3f}, max "
        f"{t['max']:.3f}); {args.batch_size / t['median']:.2f} clips/s; loss {t['loss']:.4f}")


if __name__ == "__main__":
  main()
