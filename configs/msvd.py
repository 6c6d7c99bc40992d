r"""MSVD, CLIP ViT-B/32, DMAE + NegNCE + TPM-CL: L=32, F=12, 5 epochs, batch 128.

The recipe is docs/method.md §6.

Prepare (once):
  python -m tvr_jax.convert --src ViT-B-32.pt --out checkpoints/ViT-B-32
  python -m data_prep.build msvd --manual_dir=/path/to/MSVD --data_dir=data/tfds

Train (evaluates on the test split after every epoch):
  python -m tvr_jax.main --config=configs/msvd.py --workdir=runs/msvd

Smoke run on a laptop: --config=configs/msvd.py:runlocal
"""

from configs import base


def get_config(arg: str = ""):
  """MSVD config; `arg` 'runlocal' shrinks it to a few steps on one device."""
  c = base.get_base_config()
  c.dataset = "msvd"
  c.max_words, c.num_frames, c.num_epochs, c.batch_size = 32, 12, 5, 128
  return base.apply_arg(c, arg)
