"""Parameters that get no gradient by design neither decay nor move.

The release's sentence-to-video predictor (`visual_predictor`) gets exactly zero gradient; without
freezing, decoupled weight decay 0.2 would shrink it every step. Real gradients of a tiny
retrieval model drive a few optimizer steps.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tvr_jax import optimizer
from tvr_jax.models.clip import CLIPConfig
from tvr_jax.models.retrieval import RetrievalConfig, RetrievalModel

CONFIG = dict(groups=[(r"^clip/", 1e-3), (r".*", 1e-2)], b1=0.9, b2=0.98, eps=1e-6,
              weight_decay=0.2, warmup_fraction=0.0, grad_clip_norm=1.0)
B, L, F = 4, 8, 3


def _batch():
  rng = np.random.default_rng(0)
  ids = np.zeros((B, L), np.int32)
  for i in range(B):
    n = 2 + i % 4
    ids[i, 0], ids[i, 1:1 + n], ids[i, 1 + n] = 49406, rng.integers(1, 49000, n), 49407
  return dict(text_ids=jnp.asarray(ids),
              frames=jnp.asarray(rng.integers(0, 256, (B, F, 32, 32, 3), dtype=np.uint8)),
              frame_mask=jnp.asarray((np.arange(F)[None] < np.array([F, 2, 1, F])[:, None])
                                     .astype(np.int32)))


def _train(train_t2v_predictor: bool, steps: int = 3):
  model = RetrievalModel(
      RetrievalConfig(max_words=L, max_frames=F, train_t2v_predictor=train_t2v_predictor),
      clip_config=CLIPConfig.preset("tiny"), rngs=nnx.Rngs(0))
  graph, state, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(state)
  tx, _ = optimizer.build(CONFIG, 10, params, frozen=model.untrained_params())
  opt_state = tx.init(params)
  batch = _batch()

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      return nnx.merge(graph, p, rest).loss(batch)[0]
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, grads

  initial = jax.tree.map(np.asarray, params)
  for _ in range(steps):
    params, opt_state, grads = step(params, opt_state)
  return model, initial, jax.tree.map(np.asarray, params), grads


def _moved(before, after):
  return [np.any(a != b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]


def test_untrained_visual_predictor_stays_bit_identical():
  model, initial, final, grads = _train(train_t2v_predictor=False)
  assert model.untrained_params() == (r"^visual_predictor/",)
  assert all(np.all(g == 0) for g in jax.tree.leaves(grads["visual_predictor"]))
  # Decayed leaves included (the predictor's kernels are not in the no-decay list).
  assert optimizer.decay_mask(initial)["visual_predictor"]["fc1"]["kernel"]
  jax.tree.map(np.testing.assert_array_equal, final["visual_predictor"],
               initial["visual_predictor"])
  assert all(_moved(initial["word_predictor"], final["word_predictor"]))


def test_trained_visual_predictor_moves():
  model, initial, final, grads = _train(train_t2v_predictor=True)
  assert model.untrained_params() == ()
  assert any(np.any(g != 0) for g in jax.tree.leaves(grads["visual_predictor"]))
  assert all(_moved(initial["visual_predictor"], final["visual_predictor"]))
  assert all(_moved(initial["word_predictor"], final["word_predictor"]))


def test_frozen_leaves_have_no_update_whatever_the_gradient():
  params = {"clip": {"w": jnp.ones((2, 2))}, "visual_predictor": {"fc1": {"kernel": jnp.ones(3)}},
            "word_predictor": {"fc1": {"kernel": jnp.ones(3)}}}
  tx, _ = optimizer.build(CONFIG, 10, params, frozen=(r"^visual_predictor/",))
  grads = jax.tree.map(jnp.ones_like, params)
  opt_state = tx.init(params)
  for _ in range(2):
    updates, opt_state = tx.update(grads, opt_state, params)
  assert np.all(np.asarray(updates["visual_predictor"]["fc1"]["kernel"]) == 0)
  assert np.all(np.asarray(updates["word_predictor"]["fc1"]["kernel"]) != 0)
  labels = optimizer.group_labels(params, CONFIG["groups"], (r"^visual_predictor/",))
  assert labels["visual_predictor"]["fc1"]["kernel"] == optimizer.FROZEN_LABEL


def test_create_train_state_freezes_what_the_model_does_not_train():
  from configs import synthetic as synthetic_config
  from tvr_jax import sharding, train
  c = synthetic_config.get_config()
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  state, setup = train.create_train_state(c, mesh, total_steps=10)
  params = state["params"]
  grads = jax.tree.map(jnp.ones_like, params)
  opt_state = setup.tx.init(params)
  for _ in range(2):  # the first step of the warmup has lr 0
    updates, opt_state = setup.tx.update(grads, opt_state, params)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates["visual_predictor"]))
  assert all(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates["word_predictor"]))
