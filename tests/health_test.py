"""The training-health guard: saturation indicator, its one line, a constructed saturated run."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import synthetic as synthetic_config
from tvr_jax import health, losses, sharding, train
from tvr_jax.models import build as build_lib


def _brute_saturated(sim, scale=100.0, eps=1e-6):
  """Per query, with float64 loops: positive prob <= eps and every prob at a clip bound."""
  def rows(s):
    out = []
    for i in range(s.shape[0]):
      z = np.exp(scale * (s[i] - s[i].max()))
      p = z / z.sum()
      out.append(p[i] <= eps and all(q <= eps or q >= 1 - eps for q in p))
    return np.mean(out)
  return 0.5 * (rows(sim) + rows(sim.T))


def test_saturated_fraction_against_brute_force():
  rng = np.random.default_rng(0)
  b = 8
  shift = np.roll(np.eye(b), 1, axis=1)      # every text's (and video's) best match is wrong
  cases = {"collapsed on wrong matches": 0.01 * rng.normal(size=(b, b)) + 0.5 * shift,
           "confident and right": 0.01 * rng.normal(size=(b, b)) + 0.5 * np.eye(b),
           "random": 0.1 * rng.normal(size=(b, b)),
           "half the rows": 0.5 * np.where(np.arange(b)[:, None] < 4, shift, np.eye(b))}
  want = {"collapsed on wrong matches": 1.0, "confident and right": 0.0, "random": None,
          "half the rows": None}
  for name, sim in cases.items():
    got = float(losses.saturated_fraction(jnp.asarray(sim, jnp.float32)))
    assert got == pytest.approx(_brute_saturated(sim), abs=1e-6), name
    if want[name] is not None:
      assert got == want[name], name
  # Saturated means NegNCE is clipped flat: -log(eps) on the positive and no gradient.
  sim = jnp.asarray(cases["collapsed on wrong matches"], jnp.float32)
  assert float(losses.negnce(sim, neg_weight=0.0)) == pytest.approx(-np.log(1e-6), rel=1e-4)


def _saturated_metrics(steps, saturated=1.0):
  return [(s, {"saturated": saturated, "loss": 13.8, "grad_norm": 0.0}) for s in steps]


def test_guard_fires_once_with_the_step_range(capsys):
  guard = health.SaturationGuard(window=100, policy="warn")
  lines = [guard.check(s, m) for s, m in _saturated_metrics(range(20, 401, 20))]
  fired = [line for line in lines if line]
  assert len(fired) == 1 and "from step 20 to 120" in fired[0]
  assert "renormalize_after_header" in fired[0] and "saturation_policy=stop" in fired[0]
  assert capsys.readouterr().out.count("training saturated") == 1
  # A healthy log step ends the stretch; a new saturated stretch is reported again.
  assert guard.check(420, {"saturated": 0.0}) is None
  later = [guard.check(s, m) for s, m in _saturated_metrics(range(440, 561, 20))]
  assert sum(bool(x) for x in later) == 1


def test_guard_silent_below_threshold_and_off_and_stop_raises():
  quiet = health.SaturationGuard(window=20, policy="warn")
  assert not any(quiet.check(s, m) for s, m in _saturated_metrics(range(10, 500, 10), 0.5))
  off = health.SaturationGuard(window=20, policy="off")
  assert not any(off.check(s, m) for s, m in _saturated_metrics(range(10, 500, 10)))
  stop = health.SaturationGuard(window=20, policy="stop")
  with pytest.raises(health.TrainingSaturatedError, match="from step 10 to 30"):
    for s, m in _saturated_metrics(range(10, 100, 10)):
      stop.check(s, m)
  with pytest.raises(ValueError, match="saturation_policy"):
    health.SaturationGuard(10, "ignore")


def _config():
  c = synthetic_config.get_config("smoke")
  c.clip_preset, c.image_size, c.num_frames, c.max_words, c.batch_size = "tiny", 32, 4, 16, 8
  return c


def _batch(seed, b=8):
  rng = np.random.default_rng(seed)
  ids = np.zeros((b, 16), np.int32)
  ids[:, 0], ids[:, 1:5], ids[:, 5] = 49406, rng.integers(1, 999, (b, 4)), 49407
  return {"frames": rng.integers(0, 256, (b, 4, 32, 32, 3), dtype=np.uint8),
          "frame_mask": np.ones((b, 4), np.int32), "text_ids": ids}


def _saturating_model_fn(config, load_weights=True):
  """The real model whose similarity gets a large bonus on a wrong pairing (i -> i+1)."""
  from tvr_jax.models import retrieval

  class Saturating(retrieval.RetrievalModel):
    def similarity(self, text_feats, video_feats):
      sim = super().similarity(text_feats, video_feats)
      return sim + 0.5 * jnp.roll(jnp.eye(sim.shape[0], dtype=sim.dtype), 1, axis=1)

  m = build_lib.build_model(config, load_weights=load_weights)
  return Saturating(m.config, m.clip, rngs=nnx.Rngs(config.seed + 1))


@pytest.mark.parametrize("saturating", [True, False], ids=["constructed_saturated", "default"])
def test_guard_on_real_train_steps(saturating, capsys):
  """The train step's `saturated` metric drives the guard: it fires on a run whose softmax is
  saturated on wrong matches and stays silent on the default model."""
  c = _config()
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1})
  state, setup = train.create_train_state(
      c, mesh, total_steps=10, model_fn=_saturating_model_fn if saturating else None)
  step = train.make_train_step(setup, mesh)
  guard = health.SaturationGuard(window=3, policy="warn")
  fired = []
  for i in range(1, 5):
    state, metrics = step(state, _batch(i))
    metrics = {k: float(v) for k, v in metrics.items()}
    assert 0.0 <= metrics["saturated"] <= 1.0
    assert "loss/saturated" not in metrics   # an indicator, not a loss term
    fired.append(guard.check(i, metrics))
  if saturating:
    # NegNCE is clipped flat at -log(1e-6) per term (TPM-CL still has a gradient here).
    assert metrics["saturated"] == 1.0 and metrics["loss/negnce"] > 13.8
    assert [bool(f) for f in fired] == [False, False, True, False]
    assert "from step 1 to 3" in fired[2]
  else:
    assert metrics["saturated"] == 0.0 and not any(fired)
    assert "training saturated" not in capsys.readouterr().out
