"""tvr_jax: DMAE / NegNCE / TPM-CL text-video retrieval on CLIP towers, in JAX/Flax.

The public API is imported lazily so that `import tvr_jax` stays cheap (no JAX start-up for
tokenizer-only use).
"""

__all__ = ["load_clip", "tokenize"]


def __getattr__(name):
  if name == "tokenize":
    from tvr_jax.tokenizer import tokenize
    return tokenize
  if name == "load_clip":
    from tvr_jax.models.clip import load_clip
    return load_clip
  raise AttributeError(f"module 'tvr_jax' has no attribute {name!r}")
