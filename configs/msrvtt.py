r"""MSR-VTT (9k train, 1k-A test), CLIP ViT-B/32, DMAE + NegNCE + TPM-CL: L=32, F=12, 5 epochs.

Batch 128; the recipe is docs/method.md §6.

Prepare (once):
  python -m tvr_jax.convert --src ViT-B-32.pt --out checkpoints/ViT-B-32
  python -m data_prep.build msrvtt --manual_dir=/path/to/MSRVTT --data_dir=data/tfds

Train (one epoch = every (video, caption) pair of the 9k split, ~180k):
  python -m tvr_jax.main --config=configs/msrvtt.py --workdir=runs/msrvtt

ViT-B/16: add --config.init_from=checkpoints/ViT-B-16 (converted from ViT-B-16.pt).
Smoke run: --config=configs/msrvtt.py:runlocal
"""

from configs import base


def get_config(arg: str = ""):
  """MSR-VTT config; `arg` 'runlocal' shrinks it to a few steps."""
  c = base.get_base_config()
  c.dataset = "msrvtt"
  c.max_words, c.num_frames, c.num_epochs, c.batch_size = 32, 12, 5, 128
  return base.apply_arg(c, arg)
