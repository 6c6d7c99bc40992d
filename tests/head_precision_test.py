"""RetrievalConfig.head_precision: the head's and the scorer's dots carry HIGHEST precision.

Checked on the lowered StableHLO text (`jax.jit(f).lower(...).as_text()`), whose `dot_general`
ops each print `precision = [A, B]`: with the default "highest" every dot of the head (and of its
gradient) says HIGHEST while the towers' dots do not; with "default" none does. On the CPU float32
dots are exact either way, so the numbers must not change.
"""

import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tvr_jax import scoring
from tvr_jax.models.clip import CLIPConfig
from tvr_jax.models.retrieval import RetrievalConfig, RetrievalModel

CLIP_CFG = CLIPConfig.preset("tiny", embed_dim=64, text_layers=4)
B, L, F, D = 4, 8, 3, 64
DOT = re.compile(r"stablehlo\.dot_general[^\n]*?precision = \[(\w+), (\w+)\]")


def _dots(hlo: str) -> list[tuple[str, str]]:
  dots = DOT.findall(hlo)
  assert len(dots) == hlo.count("stablehlo.dot_general"), "a dot without a precision attribute"
  return dots


def _features(seed=0):
  rng = np.random.default_rng(seed)
  unit = lambda *s: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(
      rng.standard_normal(s).astype(np.float32))
  tmask = (np.arange(L)[None] <= np.array([2, 7, 4, 5])[:, None]).astype(np.int32)
  vmask = (np.arange(F)[None] < np.array([F, 2, 1, F])[:, None]).astype(np.int32)
  return (unit(B, D), unit(B, L, D), tmask), unit(B, F, D), vmask


def _batch():
  rng = np.random.default_rng(1)
  ids = np.zeros((B, L), np.int32)
  for i in range(B):
    ids[i, 0], ids[i, 1:3 + i], ids[i, 3 + i] = 49406, rng.integers(1, 49000, 2 + i), 49407
  return dict(text_ids=jnp.asarray(ids),
              frames=jnp.asarray(rng.integers(0, 256, (B, F, 32, 32, 3), dtype=np.uint8)),
              frame_mask=jnp.asarray(_features()[2]))


def _model(precision, **kw):
  return RetrievalModel(RetrievalConfig(max_words=L, max_frames=F, head_precision=precision,
                                        **kw), clip_config=CLIP_CFG, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("header,token_weights", [("seqTransf", True)])
def test_head_dots_are_highest_by_default(header, token_weights):
  text, tokens, vmask = _features()
  results = {}
  for precision in ("highest", "default"):
    model = _model(precision, header=header, token_weights=token_weights)
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def head(p, text, tokens, vmask, graph=graph, rest=rest):
      return nnx.merge(graph, p, rest).head_loss(text, tokens, vmask)[0]
    fn = jax.value_and_grad(head)
    dots = _dots(jax.jit(fn).lower(params, text, tokens, vmask).as_text())
    assert len(dots) > 10, dots  # DMAE, TPM-CL predictors, header / token weights, backward
    kinds = {p for pair in dots for p in pair}
    assert kinds == ({"HIGHEST"} if precision == "highest" else {"DEFAULT"}), (precision, kinds)
    def sim_fn(p, *a, graph=graph, rest=rest):
      return nnx.merge(graph, p, rest).similarity(a[:3], a[3:])
    sim_dots = _dots(jax.jit(sim_fn).lower(params, *text, tokens, vmask).as_text())
    assert {p for pair in sim_dots for p in pair} == kinds
    results[precision] = jax.jit(fn)(params, text, tokens, vmask)
  # Same numbers on the CPU (float32 dots are full precision there either way).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               results["highest"], results["default"])


def test_towers_keep_their_precision_in_the_loss():
  batch = _batch()
  counts = {}
  for precision in ("highest", "default"):
    graph, params, rest = nnx.split(_model(precision), nnx.Param, ...)
    fn = lambda p, b, graph=graph, rest=rest: nnx.merge(graph, p, rest).loss(b)[0]
    dots = _dots(jax.jit(fn).lower(params, batch).as_text())
    counts[precision] = (sum(d == ("HIGHEST", "HIGHEST") for d in dots), len(dots))
  n_highest, n_all = counts["highest"]
  assert counts["default"] == (0, n_all)
  assert 0 < n_highest < n_all  # head dots HIGHEST, tower dots left to the backend


@pytest.mark.parametrize("precision", ["highest", "default"])
def test_scorer_dots_follow_the_setting(precision):
  (sent, words, tmask), tokens, vmask = _features()
  scorer = scoring.ChunkedScorer(1 << 20, show_progress=False, precision=precision)
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (sent, words, tmask, tokens, vmask)]
  dots = _dots(scorer._jitted.lower(*shapes, None, None).as_text())
  assert dots and {p for pair in dots for p in pair} == {
      "HIGHEST" if precision == "highest" else "DEFAULT"}
  got = scorer((sent, words, tmask), (tokens, vmask))
  want = scoring.ChunkedScorer(1 << 20, show_progress=False, precision="highest")(
      (sent, words, tmask), (tokens, vmask))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # score_model takes the model's setting.
  model = _model(precision)
  np.testing.assert_allclose(scoring.score_model(model, (sent, words, tmask), (tokens, vmask),
                                                 show_progress=False), want, rtol=1e-6,
                             atol=1e-7)


def test_unknown_setting_is_refused():
  with pytest.raises(ValueError, match="head_precision.*'tf32'"):
    RetrievalConfig(head_precision="tf32")
  with pytest.raises(ValueError, match="'bf16'"):
    scoring.ChunkedScorer(1 << 20, precision="bf16")
