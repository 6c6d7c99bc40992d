r"""DiDeMo paragraph-to-video, CLIP ViT-B/32: L=64, F=64, 20 epochs, batch 64.

The recipe is docs/method.md §6.

Prepare (once):
  python -m tvr_jax.convert --src ViT-B-32.pt --out checkpoints/ViT-B-32
  python -m data_prep.build didemo --manual_dir=/path/to/DiDeMo --data_dir=data/tfds

Train (one paragraph, all sentences joined, per video):
  python -m tvr_jax.main --config=configs/didemo.py --workdir=runs/didemo

64 frames per clip: on memory-limited GPUs add --config.remat=True --config.dtype=bfloat16.
Smoke run: --config=configs/didemo.py:runlocal
"""

from configs import base


def get_config(arg: str = ""):
  """DiDeMo config; `arg` 'runlocal' shrinks it to a few steps."""
  c = base.get_base_config()
  c.dataset = "didemo"
  c.max_words, c.num_frames, c.num_epochs, c.batch_size = 64, 64, 20, 64
  c.train_caption_mode = c.eval_caption_mode = "paragraph"   # all sentences joined per video
  c.eval_split = "test"
  return base.apply_arg(c, arg)
