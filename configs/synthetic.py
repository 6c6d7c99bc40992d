r"""The embedded default: a tiny CLIP trained from scratch on the synthetic moving-shapes set.

Runs on a laptop CPU in a few minutes; builds the dataset on first use (about a minute, ~11 MB raw):
  python -m tvr_jax.main --config=configs/synthetic.py --workdir=runs/synthetic

What it shows: the whole path (TFDS build → Grain → sharded train step with DMAE + NegNCE + TPM-CL
→ Orbax checkpoints → chunked evaluation with the multi-caption protocol) learns. Captions of a
distractor pair differ only in the direction of motion, which only the frame order shows.

Shorter runs: `:smoke` (a few steps, used by the end-to-end test) and `:test` (the test suite's
shortened training run). Explicit sizes: --config.num_train_steps=N --config.batch_size=B.
"""

from configs import base


def get_config(arg: str = ""):
  """Synthetic config; `arg` '' (full default run), 'test' (shortened) or 'smoke'/'runlocal'."""
  c = base.get_base_config()
  c.dataset = "synthetic"
  c.data_dir = "data/tfds"
  c.build_if_missing = True      # nothing to download: the set is rendered locally
  c.eval_split = "test"
  c.num_frames, c.image_size, c.max_words = 8, 64, 24   # the builder's default config (8 x 64 px)
  c.cache_frames = True          # ~10 MB of decoded frames: decode once
  c.num_workers = 0              # small batches: reading in the main process is fastest here

  # seqTransf (--config.model.header=seqTransf) is initialised from scratch here (embed width 32 !=
  # text width 64) and needs its output re-normalised, else NegNCE saturates at chance; meanP
  # ignores the flag.
  c.model.renormalize_after_header = True
  c.init_from = ""               # from scratch ...
  c.clip_preset = "tiny-64"      # ... tiny CLIP with 64 px input and 16 px patches (see train.py)
  c.optimizer.groups = [(r".*", 1e-3)]   # everything is new here: one group
  c.optimizer.weight_decay = 0.05

  c.batch_size = 64
  c.num_epochs = 10
  c.log_every = 20
  c.eval_every = 0               # evaluate at the end only
  c.eval_batch_size = 128
  c.checkpoint_every = 200
  if arg == "test":
    c.num_epochs = 2
    c.progress_bar = False
    return c
  if arg in base.SHRINK_ARGS:
    c = base.apply_arg(c, arg)
    c.cache_frames = True
    c.eval_max_examples = 32
    return c
  return base.apply_arg(c, arg)
