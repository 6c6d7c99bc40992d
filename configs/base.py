"""Defaults shared by every experiment config (the recipe of docs/method.md §6, MSR-VTT/MSVD sizes).

Not run on its own: each dataset config imports `get_base_config()` and edits what differs. Every
key a run may use is declared here and the returned ConfigDict is locked, so a typo in a config
file (`c.lerning_rate = ...`) fails on the line that writes it, and one on the command line
(`--config.lerning_rate=...`) fails before the run starts, instead of being silently ignored.
"""

import ml_collections

# Learning rates of the release: 1e-7 for CLIP parameters, 1e-4 for new modules (header, TPM-CL).
CLIP_LR = 1e-7
NEW_LR = 1e-4


def get_base_config() -> ml_collections.ConfigDict:
  """The defaults; dataset configs override a few keys."""
  c = ml_collections.ConfigDict()
  c.mode = "train"               # "train" (with periodic evaluation) or "eval" (evaluate once)
  c.seed = 0

  # ---- data ------------------------------------------------------------------------------------
  c.dataset = "msvd"             # TFDS builder name (data_prep/)
  c.data_dir = "data/tfds"       # TFDS data_dir written by `python -m data_prep.build`
  c.build_if_missing = False     # only the synthetic set builds itself
  c.train_split = "train"
  c.eval_split = "test"
  c.max_words = 32               # L, with start/end tokens
  c.num_frames = 12              # F
  c.image_size = 224             # frames are resized/cropped to this on device
  c.num_workers = 2              # Grain worker processes (0: read in the main process)
  c.train_caption_mode = "all"   # "all": every caption is an example; "paragraph": joined per video
  c.eval_caption_mode = "all"
  c.cache_frames = False         # decode every frame once into a RAM-backed cache (small sets)

  # ---- model -----------------------------------------------------------------------------------
  # Converted CLIP weights (python -m tvr_jax.convert); "" = from scratch.
  c.init_from = "checkpoints/ViT-B-32"
  c.clip_preset = "ViT-B/32"     # CLIP size when training from scratch (init_from == "")
  c.dtype = "float32"            # compute dtype; "bfloat16" keeps float32 master weights
  c.remat = False                # rematerialise each residual block (saves activation memory)
  c.attention_impl = ""          # "", "xla" or "cudnn" (jax.nn.dot_product_attention)
  # Fields of tvr_jax.models.retrieval.RetrievalConfig (max_words / max_frames come from above).
  c.model = ml_collections.ConfigDict()
  c.model.header = "meanP"       # temporal header: "meanP" | "seqTransf"
  c.model.header_layers = 4
  c.model.renormalize_after_header = False   # CLIP4Clip re-normalises; the release does not
  c.model.pooled_video = False   # True: CLIP4Clip meanP (one mean-pooled video token), the baseline
  c.model.textual_attention = True
  c.model.visual_attention = True
  c.model.keyword_weighting = False
  c.model.token_weights = False  # "wti" learned token weights (optional variant)
  c.model.contrastive_loss = "negnce"  # "negnce" | "infonce"
  c.model.partial_type = 4       # TPM-CL: 4 = T1+T2+T3, 2 = T1+T2, 3 = T3, 0 = off
  c.model.tau = 0.6
  c.model.delta = 0.6
  c.model.tpm_weight = 1.0
  c.model.train_t2v_predictor = False   # NOT the release: let the sentence->video predictor train
  c.model.head_precision = "highest"    # matmuls after the towers + scorer: "highest" | "default"

  # ---- optimisation ----------------------------------------------------------------------------
  c.batch_size = 128             # GLOBAL batch: the same objective on 1, 8 or 256 devices
  c.num_epochs = 5
  c.num_train_steps = -1         # > 0 overrides num_epochs
  c.accum_steps = 1              # > 1: exact gradient caching in k micro-batches (docs/training.md)
  c.nan_policy = "stop"          # "stop": raise with the step number; "skip": drop that update
  # saturated NegNCE/InfoNCE for a window: "warn" (one line) | "stop" | "off"
  c.saturation_policy = "warn"
  c.saturation_window = 100      # steps (checked at log steps) a saturated stretch must span
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.groups = [(r"^clip/", CLIP_LR), (r".*", NEW_LR)]   # (regex on param path, peak lr)
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-6
  c.optimizer.weight_decay = 0.2
  c.optimizer.warmup_fraction = 0.1
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.clamp_logit_scale = True

  # ---- parallelism -----------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})    # -1 absorbs the remaining devices
  # (regex on leaf path, rule), first match wins: tvr_jax.sharding.DEFAULT_RULES, docs/aot.md.
  c.sharding_rules = [(r"token_embedding", "replicate"), (r".*", "fsdp")]
  c.min_fsdp_size = 2 ** 14      # leaves with fewer elements stay replicated

  # ---- logging, checkpoints, evaluation ----------------------------------------------------------
  c.log_every = 50
  c.progress_bar = True
  c.checkpoint_every = 1000      # steps; a final checkpoint is always written
  c.keep_checkpoints = 2         # latest K, plus the best by `best_metric`
  c.best_metric = "t2v/R@1"
  c.async_checkpoints = True
  c.eval_every = -1              # steps; -1 = once per epoch and at the end; 0 = only at the end
  c.eval_batch_size = 128        # videos or captions per encoding batch
  c.eval_max_examples = -1       # > 0: evaluate on the first N videos only (smoke runs)
  c.score_budget_mb = 1024       # per-device memory budget of one block of the chunked DMAE scorer
  # Caption batches are sorted by length and cut to the smallest of these column counts that
  # holds their longest caption (max_words is always the last); () = every batch at max_words.
  c.eval_length_buckets = (8, 16, 24)
  c.eval_lower_median = False    # multi-caption t2v MdR: lower middle (CLIP4Clip, torch.median)
  c.dsl = True                   # also report dual-softmax (DSL) rows, labelled separately
  c.eval_save_scores = False     # also write WORKDIR/scores_step_<N>.npz (the whole S, video ids)
  c.eval_checkpoint = ""         # mode=eval: checkpoint step dir (default: latest in workdir)
  # Comma-separated recorded keys a resume (or mode=eval) may change from the checkpoint's values,
  # e.g. "num_train_steps,optimizer.weight_decay". Checkpoints record every key that defines the
  # objective (all but tvr_jax/train.py RESUME_FREE_KEYS); see docs/training.md.
  c.resume_allow_changes = ""
  c.lock()                       # new keys are errors; values stay editable
  return c


SHRINK_ARGS = ("runlocal", "smoke")


def apply_arg(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """Applies the config-file argument (`--config=configs/x.py:ARG`).

  '' keeps the full recipe; 'runlocal' (alias 'smoke') shrinks it to a few steps of a small batch
  on one device with a small evaluation, to check that data, model and checkpoints load.
  """
  if arg in ("", None):
    return c
  if arg not in SHRINK_ARGS:
    raise ValueError(f"unknown config argument {arg!r}; "
                     f"known: '' (full run), {', '.join(SHRINK_ARGS)}")
  c.batch_size = 8
  c.num_train_steps = 4
  c.log_every = 1
  c.checkpoint_every = 4
  c.eval_every = 0
  c.eval_batch_size = 8
  c.eval_max_examples = 16
  c.num_workers = 0
  return c
