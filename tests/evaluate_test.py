"""Evaluation at scale: length-bucketed caption encoding, scoring sharded over devices and
processes, metrics from per-process rows, every model variant ("wti", keyword weights)."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT, smoke_config

from tvr_jax import evaluate, metrics, scoring, sharding
from tvr_jax.data import evaluation
from tvr_jax.models.clip import CLIPConfig
from tvr_jax.models.retrieval import RetrievalConfig, RetrievalModel

CLIP_CFG = CLIPConfig.preset("tiny", embed_dim=64, text_layers=4)
SOT, EOT = 49406, 49407


def _unit(rng, shape):
  x = rng.standard_normal(shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _features(nt, nv, words, frames, dim, seed=0, planted=False):
  """Random normalised features, several captions per video (caption i -> video i % nv)."""
  rng = np.random.default_rng(seed)
  caption_video = np.arange(nt) % nv
  lengths = rng.integers(2, words + 1, nt)
  tmask = (np.arange(words)[None] < lengths[:, None]).astype(np.int32)
  flen = rng.integers(1, frames + 1, nv)
  vmask = (np.arange(frames)[None] < flen[:, None]).astype(np.int32)
  tokens = _unit(rng, (nv, frames, dim))
  if planted:   # every word and the sentence of a caption is its video's first frame
    sent = tokens[caption_video, 0].copy()
    words_f = np.repeat(sent[:, None], words, axis=1)
    tokens = np.repeat(tokens[:, :1], frames, axis=1)
  else:
    sent, words_f = _unit(rng, (nt, dim)), _unit(rng, (nt, words, dim))
  return (sent, words_f, tmask), (tokens, vmask), caption_video


def _one_device_mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))


def _reference_metrics(sim, caption_video, **kw):
  out = metrics.retrieval_metrics(sim, caption_video, **kw)
  out.update(metrics.dsl_retrieval_metrics(sim, caption_video, **kw))
  return out


# ---- metrics from rows --------------------------------------------------------------------------
def test_planted_features_score_100_and_shuffled_chance():
  text, video, cv = _features(120, 30, 6, 4, 16, planted=True)
  rows, sim = scoring.ShardedScorer(_one_device_mesh(), 1 << 20,
                                    show_progress=False).local_rows(text, video)
  np.testing.assert_array_equal(rows, np.arange(120))
  got = evaluate.retrieval_metrics_from_rows(rows, sim, cv, 30, dsl=True)
  for key in ("t2v/R@1", "v2t/R@1", "dsl/t2v/R@1", "dsl/v2t/R@1"):
    assert got[key] == 100.0, key
  # Shuffled captions: the planted link is broken, R@1 falls to about chance (1/30 = 3.3 %).
  perm = np.random.default_rng(1).permutation(120)
  got = evaluate.retrieval_metrics_from_rows(rows, sim[perm], cv, 30)
  assert got["t2v/R@1"] < 12 and got["v2t/R@1"] < 15
  assert 10 < got["t2v/MdR"] < 21   # chance median rank is about 15.5 of 30


@pytest.mark.parametrize("one_per_video", [False, True])
def test_metrics_from_rows_equal_full_matrix_metrics(one_per_video):
  nt = 25 if one_per_video else 90
  text, video, cv = _features(nt, 25, 5, 4, 8, seed=3)
  sim = scoring.score(text, video, budget_bytes=1 << 20, show_progress=False)
  cv_arg = None if one_per_video else cv
  want = _reference_metrics(sim, cv_arg)
  # Rows split over three "processes" (uneven shares, out of order) through a fake gather.
  shares = np.array_split(np.random.default_rng(0).permutation(nt), 3)
  results = _fake_processes(shares, sim, cv, 25, dsl=True)
  for got in results:
    assert got.keys() == want.keys()
    for k in want:
      if k.startswith("dsl/"):
        assert got[k] == pytest.approx(want[k], rel=1e-6), k   # float64 normaliser
      else:
        assert got[k] == want[k], k


def _fake_processes(shares, sim, cv, nv, **kw):
  """Runs retrieval_metrics_from_rows as len(shares) processes in lockstep (threads + barrier)."""
  import threading
  n = len(shares)
  slots, barrier, results = [None] * n, threading.Barrier(n), [None] * n

  def run(p):
    def gather(x):
      barrier.wait()
      slots[p] = np.asarray(x)
      barrier.wait()
      out = np.stack(slots)
      barrier.wait()
      return out
    rows = np.sort(shares[p])
    results[p] = evaluate.retrieval_metrics_from_rows(rows, sim[rows], cv, nv, allgather=gather,
                                                      **kw)
  threads = [threading.Thread(target=run, args=(p,)) for p in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return results


def test_lower_median_is_clip4clips():
  text, video, cv = _features(60, 20, 5, 4, 8, seed=5)
  sim = scoring.score(text, video, budget_bytes=1 << 20, show_progress=False)
  got = evaluate.retrieval_metrics_from_rows(np.arange(60), sim, cv, 20, lower_median=True)
  want = metrics.retrieval_metrics(sim, cv, clip4clip_compat=True)
  assert got["t2v/MdR"] == want["t2v/MdR"]
  ranks = metrics.retrieval_ranks(sim, cv) + 1
  assert got["t2v/MdR"] == np.sort(ranks)[(len(ranks) - 1) // 2]


def test_rows_missing_is_an_error():
  text, video, cv = _features(20, 10, 5, 4, 8)
  sim = scoring.score(text, video, budget_bytes=1 << 20, show_progress=False)
  with pytest.raises(ValueError, match="score rows"):
    evaluate.retrieval_metrics_from_rows(np.arange(19), sim[:19], cv, 10)


# ---- length bucketing ---------------------------------------------------------------------------
def _every_length_ids(length, seed=0):
  """One caption per token length 2 .. L (0 .. L-2 BPE tokens between SOT and EOT), shuffled."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((length - 1, length), np.int32)
  for k in range(length - 1):
    ids[k, 0], ids[k, 1:k + 1], ids[k, k + 1] = SOT, rng.integers(1, 49000, k), EOT
  return ids[rng.permutation(length - 1)]


@pytest.mark.parametrize("variant", ["default", "wti", "keywords"])
def test_bucketed_encoding_equals_full_length(variant):
  L = 16
  model = RetrievalModel(RetrievalConfig(max_words=L, max_frames=3,
                                         token_weights=variant == "wti",
                                         keyword_weighting=variant == "keywords"),
                         clip_config=CLIP_CFG, rngs=nnx.Rngs(0))
  ids = np.concatenate([_every_length_ids(L, 0), _every_length_ids(L, 1)])
  kw = (np.random.default_rng(2).random(ids.shape) < 0.3).astype(np.int32)
  kw_arg = jnp.asarray(kw) if variant == "keywords" else None
  full = [np.asarray(x) for x in model.encode_text(jnp.asarray(ids), kw_arg)]
  if variant == "wti":   # the independent reference: the model's own weights at full length
    full.append(np.asarray(model.token_weights(jnp.asarray(full[1]), jnp.asarray(full[2]),
                                               jnp.zeros((1, 3, 64)), jnp.ones((1, 3)))[0]))
  lengths = evaluation.token_lengths(ids)
  order = np.argsort(lengths, kind="stable")
  batch = 6
  widths = evaluation.bucket_widths(lengths[order], batch, (4, 8, L))
  assert set(widths) == {4, 8, L}
  out = [np.zeros_like(f) for f in full]
  encode = nnx.jit(evaluate.encode_text_bucket)   # one compilation per bucket width
  for k, w in enumerate(widths):
    rows = order[k * batch:(k + 1) * batch]
    assert lengths[rows].max() <= w
    feats = encode(model, jnp.asarray(ids[rows, :w]),
                   None if kw_arg is None else jnp.asarray(kw[rows, :w]))
    out[0][rows] = np.asarray(feats[0])
    for o, f in zip(out[1:], feats[1:]):
      o[rows, :w] = np.asarray(f)
  mask = full[2] > 0
  np.testing.assert_array_equal(out[2], full[2])   # masks (incl. keyword 2s) identical
  np.testing.assert_allclose(out[0], full[0], atol=2e-6)
  np.testing.assert_allclose(out[1] * mask[..., None], full[1] * mask[..., None], atol=2e-6)
  if variant == "wti":
    np.testing.assert_allclose(out[3], full[3], atol=1e-6)
  if variant == "keywords":
    assert (out[2] == 2).any()


def test_encode_text_bucket_rejects_bad_input():
  model = RetrievalModel(RetrievalConfig(max_words=8, max_frames=3, keyword_weighting=True),
                         clip_config=CLIP_CFG, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_words"):
    evaluate.encode_text_bucket(model, jnp.zeros((2, 9), jnp.int32), jnp.zeros((2, 9)))
  with pytest.raises(ValueError, match="keyword_mask"):
    evaluate.encode_text_bucket(model, jnp.zeros((2, 8), jnp.int32))


class _Split:
  """The two things EvalData reads of a split for captions."""
  name, split = "stub", "test"

  def __init__(self, texts):
    self.texts = texts
    self.num_videos = len(texts)

  def caption_table(self, mode):
    return np.arange(len(self.texts), dtype=np.int32), list(self.texts)


def test_caption_batches_sorted_bucketed_cover_each_caption_once():
  words = "a man is playing a guitar on a small stage while people watch and clap loudly".split()
  texts = [" ".join(words[:k]) for k in (1, 9, 3, 15, 2, 6, 12, 4, 7, 1, 5)]
  for procs in (1, 2):
    seen = []
    for p in range(procs):
      data = evaluation.EvalData(_Split(texts), global_batch_size=4, caption_mode="all",
                                 context_length=24, length_buckets=(4, 8, 12),
                                 process_index=p, process_count=procs, keywords=True)
      full = data.text_ids
      widths = []
      for b in data.caption_batches():
        ids, rows = b["text_ids"], b["caption_index"]
        widths.append(ids.shape[1])
        assert b["keyword_mask"].shape == ids.shape
        for r, row in zip(rows[b["valid"]], ids[b["valid"]]):
          np.testing.assert_array_equal(row, full[r, :ids.shape[1]])
          assert not full[r, ids.shape[1]:].any()   # nothing was cut but padding
        seen += rows[b["valid"]].tolist()
      assert widths == [8, 12, 24]   # 3 batches of 4 sorted captions: longest 5, 9, 17 tokens
    assert sorted(seen) == list(range(len(texts)))
  plain = evaluation.EvalData(_Split(texts), global_batch_size=4, caption_mode="all",
                              context_length=24)
  assert {b["text_ids"].shape[1] for b in plain.caption_batches()} == {24}


def test_bucket_widths_error_names_the_buckets():
  with pytest.raises(ValueError, match=r"length_buckets \[4, 8\]"):
    evaluation.bucket_widths(np.array([3, 5, 9]), 2, (4, 8))


# ---- sharded scoring ----------------------------------------------------------------------------
@pytest.mark.devices(8)
def test_sharded_scoring_on_8_devices_equals_one_device():
  text, video, cv = _features(203, 17, 6, 5, 16, seed=7)
  rng = np.random.default_rng(8)
  ww = rng.random(text[2].shape).astype(np.float32) * text[2]
  fw = rng.random(video[1].shape).astype(np.float32) * video[1]
  budget = 60_000    # small: the per-device text block is budget-bound, the same on 1 and 8
  out = {}
  for n in (1, 8):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]).reshape(n // 2 or 1, -1), ("a", "b"))
    for weighted in (False, True):
      sc = scoring.ShardedScorer(mesh, budget, show_progress=False)
      args = (ww, fw) if weighted else ()
      rows, sim = sc.local_rows(text, video, *args)
      ref = scoring.score(text, video, budget_bytes=1 << 22, show_progress=False,
                          word_weights=ww if weighted else None,
                          frame_weights=fw if weighted else None)
      m = evaluate.retrieval_metrics_from_rows(rows, sim, cv, 17, dsl=True)
      out[(n, weighted)] = dict(rows=rows.tolist(), metrics=m, chunk=sc.plan.text_chunk,
                                err=float(np.abs(sim - ref[rows]).max()), sim=sim)
  for weighted in (False, True):
    one, eight = out[(1, weighted)], out[(8, weighted)]
    assert one["rows"] == eight["rows"] == list(range(203))
    assert one["chunk"] == eight["chunk"] < 203 // 8   # eight devices score 8 blocks at once
    np.testing.assert_array_equal(eight["sim"], one["sim"])   # bit-identical rows
    assert eight["metrics"] == one["metrics"]
    assert one["err"] < 1e-5                              # against the single-device scorer


_PROCESS_WORKER = r"""
import json, sys
import jax
n_proc, pid, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if n_proc > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=n_proc,
                             process_id=pid)
import numpy as np
from tvr_jax import evaluate, scoring
from evaluate_test import _features
text, video, cv = _features(203, 17, 6, 5, 16, seed=7)
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
rows, sim = scoring.ShardedScorer(mesh, 60_000, show_progress=False).local_rows(text, video)
m = evaluate.retrieval_metrics_from_rows(rows, sim, cv, 17, dsl=True)
print(json.dumps({"rows": rows.tolist(), "metrics": m, "devices": jax.device_count(),
                  "sim": sim.tobytes().hex()}))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_score_different_shares_with_equal_metrics():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.path.dirname(__file__))
  env.pop("XLA_FLAGS", None)
  port = str(_free_port())
  cmds = [[sys.executable, "-c", _PROCESS_WORKER, "2", str(p), port] for p in range(2)]
  cmds.append([sys.executable, "-c", _PROCESS_WORKER, "1", "0", "0"])
  procs = [subprocess.Popen(c, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for c in cmds]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-4000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  a, b, one = outs
  assert a["devices"] == b["devices"] == 2 and one["devices"] == 1
  assert a["rows"] and b["rows"] and not set(a["rows"]) & set(b["rows"])   # different shares
  assert sorted(a["rows"] + b["rows"]) == one["rows"] == list(range(203))
  assert a["metrics"] == b["metrics"] == one["metrics"]
  sim_one = np.frombuffer(bytes.fromhex(one["sim"]), np.float32).reshape(203, 17)
  for part in (a, b):
    got = np.frombuffer(bytes.fromhex(part["sim"]), np.float32).reshape(-1, 17)
    np.testing.assert_array_equal(got, sim_one[part["rows"]])


# ---- the Evaluator on every variant -------------------------------------------------------------
def test_switch_mismatch_is_an_error():
  base = RetrievalConfig(max_words=8, max_frames=3)
  evaluate.check_switches(base, RetrievalConfig(max_words=8, max_frames=3))
  for change in ({"token_weights": True}, {"visual_attention": False},
                 {"keyword_weighting": True}):
    name = next(iter(change))
    with pytest.raises(ValueError, match=f"config.model.{name}"):
      evaluate.check_switches(base, RetrievalConfig(max_words=8, max_frames=3, **change))


def test_wti_model_evaluates(small_synthetic_data):
  """A "wti" model runs through Evaluator.run; its metrics equal those of the model's own
  similarity on the cached features (`scoring.score_model`, weights from the features)."""
  from tvr_jax import train
  c = smoke_config(small_synthetic_data, **{"model.token_weights": True,
                                            "eval_lower_median": True, "eval_max_examples": 8})
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  state, setup = train.create_train_state(c, mesh, total_steps=10)
  ev = evaluate.Evaluator(c, mesh, setup.graphdef, has_rest=setup.has_rest)
  got = ev.run(state, 0)
  texts, videos = ev.encode(state)
  assert len(texts) == 4 and len(videos) == 3   # word and frame weights
  model = nnx.merge(setup.graphdef, state["params"], state.get("rest") or {})
  sim = scoring.score_model(model, texts[:3], videos[:2], show_progress=False)
  rows, sim_rows = ev.score_rows(texts, videos)
  np.testing.assert_allclose(sim_rows, sim[rows], atol=1e-5)
  cv = ev.data.caption_to_video
  want = metrics.retrieval_metrics(sim_rows, cv)
  compat = metrics.retrieval_metrics(sim_rows, cv, clip4clip_compat=True)
  assert got["t2v/MdR"] == compat["t2v/MdR"]   # eval_lower_median reaches the metrics
  for k in want:
    if k != "t2v/MdR":
      assert got[k] == want[k], k
  assert "dsl/t2v/R@1" in got
