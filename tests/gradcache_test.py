"""Gradient caching (tvr_jax/gradcache.py): accum_steps k > 1 equals the global-batch step.

NegNCE + TPM-CL type 4 + both attentions, meanP and seqTransf, float32, tiny CLIP: the loss, every
gradient leaf and the parameters after three optimizer steps at k = 2 and 4 against k = 1 (the
plain `jax.value_and_grad` of `model.loss` on the same batch), on one device and on 8 simulated
devices (data 2 x fsdp 4); and the errors for a batch that does not split.

Tolerances. NegNCE in float32 is sensitive: scaling every parameter by (1 + 1e-7) moves its
reference gradient by ~1.5e-5 (global relative; InfoNCE: ~1e-6), so the micro-batched features
(equal to the full-batch ones to ~1e-7) cannot give agreement much below that. The tests assert
the loss within 1e-6, the gradient within 5e-5 globally and every leaf's difference within 5e-5
of the global gradient norm (parameters and updates alike) (leaves whose exact gradient is 0,
e.g. attention key biases, carry only rounding noise, so a per-leaf relative figure is
meaningless for them); the noise floor is measured in the same run and the gradcache error must
stay within 4x of it.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from configs import base
from tvr_jax import gradcache, sharding, train
from tvr_jax.models import build as build_lib
from tvr_jax.models import clip as clip_lib
from tvr_jax.models import retrieval

F, L, R = 4, 16, 32
# seqTransf copies CLIP's text blocks: header width = text width (64), 2 blocks to copy.
TINY = clip_lib.CLIPConfig.preset("tiny", embed_dim=64)


def _config(header: str, batch_size: int, mesh_cfg: dict):
  c = base.get_base_config()
  c.init_from, c.clip_preset = "", "tiny"
  c.image_size, c.num_frames, c.max_words, c.batch_size = R, F, L, batch_size
  c.model.header, c.model.header_layers = header, 2
  # seqTransf from scratch needs CLIP4Clip's re-normalisation to leave NegNCE's clipped region
  # (tvr_jax/models/temporal.py). Without it this init starts saturated (loss 14.3, probabilities
  # at the 1e-6 clip), where the global-batch gradient itself is no reference: scaling the
  # parameters by (1 + 1e-7) moves it by 1.9e-3 relative, and caching differs from it by as much
  # (2.5e-3 at k=2, 1.2e-3 at k=4). Re-normalised, the noise floor is 5e-6 and caching agrees to
  # 1e-6..3e-6.
  c.model.renormalize_after_header = header == "seqTransf"
  c.model.contrastive_loss, c.model.partial_type = "negnce", 4
  c.model.textual_attention = c.model.visual_attention = True
  c.mesh = mesh_cfg
  c.min_fsdp_size = 512
  c.optimizer.warmup_fraction = 0.0
  # Adam's first steps are lr * g / (|g| + eps): eps = 1 keeps the update linear in g (a tiny eps
  # maps rounding noise on exactly-zero gradients to +-lr); lr 1 moves the weights visibly.
  c.optimizer.eps = 1.0
  c.optimizer.groups = [(".*", 1.0)]
  return c


def _model_fn(config, load_weights: bool = False):
  del load_weights
  clip = clip_lib.CLIP(TINY, rngs=nnx.Rngs(config.seed))
  return retrieval.RetrievalModel(build_lib.retrieval_config(config), clip,
                                  rngs=nnx.Rngs(config.seed + 1))


def _batch(n: int, seed: int = 0) -> dict:
  """n clips: ragged captions, some padded frames."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((n, L), np.int32)
  for i in range(n):
    k = 1 + (5 * i) % (L - 2)
    ids[i, 0], ids[i, 1:1 + k], ids[i, 1 + k] = 49406, rng.integers(1, 49000, k), 49407
  lengths = 1 + (np.arange(n) * 3) % F
  lengths[::2] = F
  return {"frames": rng.integers(0, 256, (n, F, R, R, 3), dtype=np.uint8),
          "frame_mask": (np.arange(F)[None] < lengths[:, None]).astype(np.int32),
          "text_ids": ids}


def _flat(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(x, np.float64)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _global_rel(a: dict, b: dict) -> float:
  num = sum(np.sum((a[k] - b[k]) ** 2) for k in a)
  den = sum(np.sum(a[k] ** 2) for k in a)
  return float(np.sqrt(num / den))


def _worst_leaf(a: dict, b: dict) -> float:
  """max over leaves of |a_leaf - b_leaf| / |a|_global."""
  norm = np.sqrt(sum(np.sum(v ** 2) for v in a.values()))
  return float(max(np.linalg.norm(a[k] - b[k]) for k in a) / norm)


def compare(headers, ks, mesh_cfg, batch_size, steps: int = 3) -> dict:
  """Runs k = 1 and each k of `ks`; returns the figures the tests assert (JSON-able)."""
  out = {}
  devices = jax.devices()
  mesh = sharding.make_mesh(mesh_cfg, devices=devices)
  host_batch = _batch(batch_size)
  with jax.default_matmul_precision("highest"):
    for header in headers:
      c = _config(header, batch_size, mesh_cfg)
      state, setup = train.create_train_state(c, mesh, total_steps=10, model_fn=_model_fn)
      batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in host_batch.items()}
      of = lambda p, setup=setup: nnx.merge(setup.graphdef, p, {})  # noqa: E731
      p0 = state["params"]

      def grads(p, k, of=of, batch=batch, setup=setup):
        if k == 1:
          return jax.value_and_grad(lambda q: of(q).loss(batch), has_aux=True)(p)
        return gradcache.value_and_grad(of, p, batch, k, mesh=mesh,
                                        param_shardings=setup.shardings["params"])

      fns = {k: jax.jit(lambda p, k=k: grads(p, k)) for k in (1, *ks)}
      (loss1, terms1), g1 = fns[1](p0)
      g1 = _flat(g1)
      # The noise floor: the reference gradient at parameters scaled by (1 + 1e-7).
      _, g_pert = fns[1](jax.tree.map(lambda x: x * (1 + 1e-7), p0))
      row = {"noise_floor": _global_rel(g1, _flat(g_pert)), "loss": float(loss1),
             "terms": sorted(terms1)}
      init = _flat(p0)
      params = {}
      for k in (1, *ks):
        if k != 1:
          (lk, tk), gk = fns[k](p0)
          gk = _flat(gk)
          assert gk.keys() == g1.keys()
          row[f"k{k}"] = {
              "loss_rel": abs(float(lk) - float(loss1)) / abs(float(loss1)),
              "terms_rel": max(abs(float(tk[n]) - float(terms1[n])) / max(abs(float(terms1[n])),
                                                                           1e-12) for n in terms1),
              "grad_rel": _global_rel(g1, gk), "grad_worst_leaf": _worst_leaf(g1, gk),
              "zero_leaves_match": all(np.all(gk[n] == 0) for n in g1 if np.all(g1[n] == 0))}
        step = train.make_train_step(setup, mesh, accum_steps=k)
        s = jax.tree.map(lambda x: x.copy(), state)
        losses = []
        for _ in range(steps):
          s, m = step(s, batch)
          losses.append(float(m["loss"]))
        params[k] = _flat(s["params"])
        if k == 1:
          row["losses"] = losses
          row["moved"] = _global_rel(init, params[1])
        else:
          ref = params[1]
          upd1 = {n: ref[n] - init[n] for n in ref}
          updk = {n: params[k][n] - init[n] for n in ref}
          row[f"k{k}"].update(
              losses=losses, param_rel=_global_rel(ref, params[k]),
              param_worst_leaf=_worst_leaf(ref, params[k]),
              # Per leaf relative to the leaf itself (zero-initialised leaves with a zero exact
              # gradient, e.g. attention key biases, are pure rounding noise: reported only).
              param_leaf_rel=max(np.linalg.norm(ref[n] - params[k][n]) /
                                 max(np.linalg.norm(ref[n]), 1e-30) for n in ref),
              update_rel=_global_rel(upd1, updk), update_worst_leaf=_worst_leaf(upd1, updk))
      out[header] = row
  return out


def check(res: dict, ks) -> None:
  """The assertions shared by the one- and eight-device tests."""
  for header, row in res.items():
    assert row["terms"] == ["negnce", "tpm", "tpm/T1", "tpm/T2", "tpm/T3"], header
    assert row["moved"] > 1e-3, (header, row["moved"])   # the three steps changed the weights
    for k in ks:
      r = row[f"k{k}"]
      msg = (header, k, r, row["noise_floor"])
      assert r["loss_rel"] < 1e-6 and r["terms_rel"] < 1e-5, msg
      assert r["grad_rel"] < 5e-5 and r["grad_rel"] < 4 * row["noise_floor"] + 1e-6, msg
      assert r["grad_worst_leaf"] < 5e-5, msg
      assert r["zero_leaves_match"], msg
      np.testing.assert_allclose(r["losses"], row["losses"], rtol=1e-5, err_msg=str(msg))
      assert r["param_rel"] < 1e-5 and r["param_worst_leaf"] < 1e-5, msg
      assert r["update_rel"] < 1e-4 and r["update_worst_leaf"] < 1e-4, msg


@pytest.mark.parametrize("header", ["meanP", "seqTransf"])
def test_gradcache_equals_global_batch_step_one_device(header):
  res = compare([header], (2, 4), {"data": 1, "fsdp": 1}, batch_size=8)
  print(json.dumps(res))
  check(res, (2, 4))


@pytest.mark.parametrize("header", ["meanP", "seqTransf"])
@pytest.mark.devices(8)
def test_gradcache_equals_global_batch_step_eight_devices(header):
  """data 2 x fsdp 4: each micro-batch spread over all 8 devices, parameters FSDP-sharded."""
  res = compare([header], (2, 4), {"data": 2, "fsdp": 4}, 32)
  print(json.dumps(res))
  check(res, (2, 4))


def test_split_order_and_round_trip():
  """Micro-batch j holds rows j, j + k, ...; merging restores the batch order."""
  x = np.arange(24).reshape(12, 2)
  micro = np.asarray(gradcache.split_microbatches(x, 3))
  assert micro.shape == (3, 4, 2)
  np.testing.assert_array_equal(micro[1], x[1::3])
  np.testing.assert_array_equal(np.asarray(gradcache.merge_microbatches(micro)), x)


@pytest.mark.devices(8)
def test_microbatches_spread_over_every_shard():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  x = jax.device_put(np.arange(64), sharding.batch_sharding(mesh))
  micro = jax.jit(lambda a: gradcache.split_microbatches(a, 4, mesh))(x)
  shards = {s.device.id: np.asarray(s.data) for s in micro.addressable_shards}
  # Every device holds a [4, 2] block: 2 rows of each of the 4 micro-batches, its own rows.
  assert all(v.shape == (4, 2) for v in shards.values()), {k: v.shape for k, v in shards.items()}
  own = {s.device.id: set(np.asarray(s.data).tolist()) for s in x.addressable_shards}
  assert all(set(v.ravel().tolist()) == own[d] for d, v in shards.items())


def test_indivisible_batch_is_a_clear_error_before_any_work():
  c = base.get_base_config()
  c.accum_steps, c.batch_size = 3, 128
  with pytest.raises(train.ConfigError,
                     match=r"config.accum_steps=3, config.batch_size=128: global batch 128 does "
                           r"not split into accum_steps=3 micro-batches over 1 data-parallel"):
    train.validate_config(c)
  c.accum_steps = 0
  with pytest.raises(train.ConfigError, match="accum_steps must be a positive integer, got 0"):
    train.validate_config(c)
  c.accum_steps = 4
  train.validate_config(c)   # 128 = 4 x 32: accepted
  with pytest.raises(ValueError, match=r"must be a multiple of accum_steps x shards = 16"):
    gradcache.check_split(24, 2, shards=8)


@pytest.mark.devices(8)
def test_indivisible_batch_over_shards_is_a_config_error():
  """8 devices: B = 24 splits into 2 micro-batches of 12, but not 12 over 8 shards."""
  c = base.get_base_config()
  c.batch_size, c.accum_steps = 24, 2
  with pytest.raises(train.ConfigError) as e:
    train.validate_config(c)
  assert ("config.accum_steps=2, config.batch_size=24: global batch 24 does not "
          "split into accum_steps=2 micro-batches over 8 data-parallel shard(s): it must be a "
          "multiple of accum_steps x shards = 16") in str(e.value)


def test_train_step_refuses_a_batch_that_does_not_split():
  """The compiled step checks the batch it gets (a direct caller may skip validate_config)."""
  c = _config("meanP", 6, {"data": 1, "fsdp": 1})
  mesh = sharding.make_mesh(c.mesh.to_dict())
  state, setup = train.create_train_state(c, mesh, total_steps=10, model_fn=_model_fn)
  step = train.make_train_step(setup, mesh, accum_steps=4)
  with pytest.raises(train.ConfigError, match="global batch 6 does not split into accum_steps=4"):
    step(state, _batch(6))
  with pytest.raises(train.ConfigError, match="accum_steps=0: use a positive integer"):
    train.make_train_step(setup, mesh, accum_steps=0)


def test_train_step_for_follows_config_accum_steps():
  """The step the trainer and the AOT tool build (`train.train_step_for`) caches when the config
  says so: at batch 32, accum_steps 4 compiles to a program with fewer temporaries than 1."""
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1})
  temps = {}
  for k in (1, 4):
    c = _config("meanP", 32, {"data": 1, "fsdp": 1})
    c.accum_steps = k
    train.validate_config(c)
    state, setup = train.abstract_train_state(c, mesh, total_steps=10, model_fn=_model_fn)
    batch = {n: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
             for n, v in _batch(32).items()}
    compiled = train.train_step_for(c, setup, mesh).lower(state, batch).compile()
    temps[k] = compiled.memory_analysis().temp_size_in_bytes
    # Gradient caching's two micro-batch loops are scans: while loops in the compiled program.
    assert ("while" in compiled.as_text()) == (k > 1), k
  assert temps[4] < 0.7 * temps[1], temps
