"""Tests for tvr_jax.metrics: golden CLIP4Clip values, brute-force loops with ties and NaN."""

import math
import statistics
import tracemalloc

import numpy as np
import pytest

from tvr_jax import metrics

# Golden key suffix → our metric name.
_GOLDEN_NAMES = {"R1": "R@1", "R5": "R@5", "R10": "R@10", "MR": "MdR", "MedianR": "MdR",
                 "MeanR": "MnR", "Std_Rank": "StdR"}
_EXACT = ("MR", "MedianR")


# ----------------------------------------------------------------------------- brute-force refs


def _brute_ranks(sim, targets):
  """Loop reference: other candidates scoring >= the truth, NaN on either side counting."""
  ranks = []
  for i, t in enumerate(targets):
    truth = float(sim[i][t])
    count = 0
    for j in range(len(sim[i])):
      other = float(sim[i][j])
      if j != t and (math.isnan(truth) or math.isnan(other) or other >= truth):
        count += 1
    ranks.append(count)
  return ranks


def _brute_metrics(ranks, lower_median=False):
  one = [r + 1 for r in ranks]
  out = {f"R@{k}": 100.0 * sum(r < k for r in ranks) / len(ranks) for k in (1, 5, 10)}
  out["MdR"] = float(statistics.median_low(one) if lower_median else statistics.median(one))
  out["MnR"] = statistics.fmean(one)
  out["StdR"] = statistics.pstdev(one)
  return out


def _brute_group_sim(sim, caption_video, n_video):
  out = [[None] * n_video for _ in range(n_video)]
  for v in range(n_video):
    for g in range(n_video):
      scores = [float(sim[c][v]) for c in range(len(caption_video)) if caption_video[c] == g]
      out[v][g] = math.nan if any(math.isnan(s) for s in scores) else max(scores)
  return np.array(out)


def _assert_metrics_close(ours, ref, prefix=""):
  for name, value in ref.items():
    np.testing.assert_allclose(ours[prefix + name], value, rtol=1e-12, err_msg=prefix + name)


def _tied_matrix(rng, n_rows, n_cols, levels=4):
  """Small-integer scores: many exact ties."""
  return rng.integers(0, levels, size=(n_rows, n_cols)).astype(np.float64)


# ----------------------------------------------------------------------------- golden


@pytest.fixture(scope="module")
def golden(golden_file):
  """The file's `metrics/` arrays (conftest's `golden_file`: skips locally, fails under CI)."""
  with np.load(golden_file) as data:
    return {k: data[k] for k in data.files if k.startswith("metrics/")}


def _check_golden_group(golden, group, ranks, results, checked):
  """Compares one golden `metrics/<case>/<dir>/` group; records the keys it used."""
  keys = [k for k in golden if k.startswith(group)]
  assert keys, f"no golden keys under {group}"
  errors = {}
  for key in keys:
    name = key[len(group):]
    ref = golden[key]
    if name == "cols":
      np.testing.assert_array_equal(ranks, ref, err_msg=key)
    elif name in _EXACT:
      assert results[_GOLDEN_NAMES[name]] == float(ref), key
    else:
      ours = results[_GOLDEN_NAMES[name]]
      np.testing.assert_allclose(ours, float(ref), rtol=1e-6, err_msg=key)
      errors[key] = abs(ours - float(ref)) / abs(float(ref))
    checked.add(key)
  return errors


def test_golden_clip4clip_metrics(golden):
  checked = {"metrics/single/sim", "metrics/multi/sim_captions_x_videos",
             "metrics/multi/caption_video", "metrics/multi/sim3d"}
  errors = {}
  # One caption per video: compute_metrics(sim) and compute_metrics(sim.T).
  sim = golden["metrics/single/sim"]
  for direction, matrix in (("t2v", sim), ("v2t", sim.T)):
    ranks = metrics.retrieval_ranks(matrix)
    for compat in (False, True):
      res = metrics.retrieval_metrics(sim, clip4clip_compat=compat)
      res = {k.split("/")[1]: v for k, v in res.items() if k.startswith(direction)}
      assert res == metrics.rank_metrics(ranks)
      errors.update(_check_golden_group(golden, f"metrics/single/{direction}/", ranks, res,
                                        checked))
  # Several captions per video.
  sim = golden["metrics/multi/sim_captions_x_videos"]
  caption_video = golden["metrics/multi/caption_video"]
  np.testing.assert_array_equal(np.bincount(caption_video),
                                golden["metrics/multi/captions_per_video"])
  checked.add("metrics/multi/captions_per_video")
  # sim3d is CLIP4Clip's padded layout of the same scores.
  sim3d = golden["metrics/multi/sim3d"]
  slot = np.concatenate([np.arange(n) for n in golden["metrics/multi/captions_per_video"]])
  np.testing.assert_array_equal(sim3d[caption_video, slot], sim)
  group_sim = metrics.caption_group_similarity(sim, caption_video)
  np.testing.assert_array_equal(group_sim, golden["metrics/multi/v2t_sim"])
  checked.add("metrics/multi/v2t_sim")
  res = metrics.retrieval_metrics(sim, caption_video, clip4clip_compat=True)
  t2v = {k[4:]: v for k, v in res.items() if k.startswith("t2v/")}
  v2t = {k[4:]: v for k, v in res.items() if k.startswith("v2t/")}
  errors.update(_check_golden_group(golden, "metrics/multi/t2v/",
                                    metrics.retrieval_ranks(sim, caption_video), t2v, checked))
  errors.update(_check_golden_group(golden, "metrics/multi/v2t/",
                                    metrics.retrieval_ranks(group_sim), v2t, checked))
  assert checked == set(golden), f"golden keys not checked: {sorted(set(golden) - checked)}"
  print("largest relative golden error:", max(errors.values()), max(errors, key=errors.get))

  # Without compat, multi t2v MdR is the usual median (docs/method.md §A.7: 4.5 instead of 4.0).
  default = metrics.retrieval_metrics(sim, caption_video)
  assert default["t2v/MdR"] == 4.5 and res["t2v/MdR"] == 4.0
  assert {k: v for k, v in default.items() if k != "t2v/MdR"} == pytest.approx(
      {k: v for k, v in res.items() if k != "t2v/MdR"}, rel=1e-6)


def test_float32_recall_rounding():
  # docs/method.md §A.7: 100 * 1/3 comes out as 33.33333206..., not 33.333333...
  res = metrics.rank_metrics(np.array([0, 5, 12]), float32_recall=True)
  assert res["R@1"] == float(np.float32(100) / np.float32(3))
  assert abs(res["R@1"] - 33.33333206) < 1e-8 and res["R@1"] != 100 / 3
  assert metrics.rank_metrics(np.array([0, 5, 12]))["R@1"] == 100 / 3


# ----------------------------------------------------------------------------- brute force


@pytest.mark.parametrize("seed", range(4))
def test_single_caption_matches_brute_force_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = 37
  sim = _tied_matrix(rng, n, n)
  if seed % 2:
    sim = sim.astype(np.float32)
  res = metrics.retrieval_metrics(sim)
  t2v = _brute_ranks(sim, range(n))
  v2t = _brute_ranks(sim.T, range(n))
  np.testing.assert_array_equal(metrics.retrieval_ranks(sim, block_rows=5), t2v)
  np.testing.assert_array_equal(metrics.retrieval_ranks(sim.T), v2t)
  _assert_metrics_close(res, _brute_metrics(t2v), "t2v/")
  _assert_metrics_close(res, _brute_metrics(v2t), "v2t/")


@pytest.mark.parametrize("seed", range(4))
def test_multi_caption_matches_brute_force_with_ties(seed):
  rng = np.random.default_rng(100 + seed)
  n_video = 9
  caption_video = np.concatenate([np.arange(n_video), rng.integers(0, n_video, 25)])
  rng.shuffle(caption_video)  # unsorted on purpose
  sim = _tied_matrix(rng, caption_video.size, n_video, levels=3)
  for compat in (False, True):
    res = metrics.retrieval_metrics(sim, caption_video, clip4clip_compat=compat)
    t2v = _brute_ranks(sim, caption_video)
    group = _brute_group_sim(sim, caption_video, n_video)
    np.testing.assert_array_equal(metrics.caption_group_similarity(sim, caption_video), group)
    v2t = _brute_ranks(group, range(n_video))
    ref_t2v = _brute_metrics(t2v, lower_median=compat)
    if compat:
      for k in (1, 5, 10):
        ref_t2v[f"R@{k}"] = float(np.float32(ref_t2v[f"R@{k}"]))
    _assert_metrics_close(res, ref_t2v, "t2v/")
    _assert_metrics_close(res, _brute_metrics(v2t), "v2t/")


def test_nan_never_flatters():
  rng = np.random.default_rng(7)
  n = 25
  sim = rng.normal(size=(n, n))
  nan_mask = rng.random((n, n)) < 0.1
  np.fill_diagonal(nan_mask[:5, :5], True)  # some NaN ground truths too
  sim[nan_mask] = np.nan
  ranks = metrics.retrieval_ranks(sim)
  np.testing.assert_array_equal(ranks, _brute_ranks(sim, range(n)))
  assert (ranks[:5] == n - 1).all()  # NaN truth ranks last
  # Whatever the NaNs stood for, the pessimistic rank is never better.
  for fill in (-np.inf, np.inf, 0.0, 1e30, -1e30):
    filled = np.where(nan_mask, fill, sim)
    assert (ranks >= metrics.retrieval_ranks(filled)).all(), fill
  for _ in range(5):
    filled = np.where(nan_mask, rng.normal(size=(n, n)) * 3, sim)
    assert (ranks >= metrics.retrieval_ranks(filled)).all()
  # Multi-caption v2t: a NaN inside a caption group makes the group's score NaN.
  caption_video = np.arange(n) % 5
  group = metrics.caption_group_similarity(sim[:, :5], caption_video)
  np.testing.assert_array_equal(group, _brute_group_sim(sim[:, :5], caption_video, 5))
  assert np.isnan(group).sum() >= 5


def test_constant_scorer_is_not_flattered():
  n = 40
  res = metrics.retrieval_metrics(np.zeros((n, n), np.float32))
  for d in ("t2v", "v2t"):
    for k in (1, 5, 10):
      assert res[f"{d}/R@{k}"] <= 100.0 * k / n  # at most chance level ...
      assert res[f"{d}/R@{k}"] == 0.0  # ... and pessimistic: every tie counts
    assert res[f"{d}/MdR"] == n and res[f"{d}/MnR"] == n
  # Several captions per video, constant scores: also no hit.
  caption_video = np.arange(3 * n) % n
  res = metrics.retrieval_metrics(np.ones((3 * n, n)), caption_video, clip4clip_compat=True)
  assert res["t2v/R@10"] == 0.0 and res["v2t/R@10"] == 0.0 and res["t2v/MdR"] == n


def test_multi_caption_by_hand():
  # Captions 0..5 belong to videos [2, 0, 1, 0, 2, 2] (unsorted).
  caption_video = np.array([2, 0, 1, 0, 2, 2])
  sim = np.array([[0.9, 0.1, 0.5],   # truth 0.5 < 0.9        -> rank 1
                  [0.2, 0.3, 0.2],   # truth 0.2: 0.3 and tie -> rank 2
                  [0.1, 0.8, 0.4],   # truth 0.8              -> rank 0
                  [0.7, 0.6, 0.1],   # truth 0.7              -> rank 0
                  [0.3, 0.3, 0.3],   # constant               -> rank 2
                  [0.0, 0.5, 0.6]])  # truth 0.6              -> rank 0
  np.testing.assert_array_equal(metrics.retrieval_ranks(sim, caption_video), [1, 2, 0, 0, 2, 0])
  # Groups: 0 = captions {1, 3}, 1 = {2}, 2 = {0, 4, 5}; entry [v, g] = max over g of sim[c, v].
  expected_group = np.array([[0.7, 0.1, 0.9],
                             [0.6, 0.8, 0.5],
                             [0.2, 0.4, 0.6]])
  np.testing.assert_array_equal(metrics.caption_group_similarity(sim, caption_video),
                                expected_group)
  res = metrics.retrieval_metrics(sim, caption_video)
  # 1-based t2v ranks [2, 3, 1, 1, 3, 1]; v2t ranks [2, 1, 1].
  assert res["t2v/R@1"] == 50.0 and res["t2v/R@5"] == 100.0
  assert res["t2v/MdR"] == 1.5 and res["t2v/MnR"] == pytest.approx(11 / 6)
  assert res["t2v/StdR"] == pytest.approx(math.sqrt(29) / 6)
  assert res["v2t/R@1"] == pytest.approx(200 / 3) and res["v2t/MdR"] == 1.0
  assert res["v2t/MnR"] == pytest.approx(4 / 3)
  compat = metrics.retrieval_metrics(sim, caption_video, clip4clip_compat=True)
  assert compat["t2v/MdR"] == 1.0  # lower middle of [1, 1, 1, 2, 3, 3]


# ----------------------------------------------------------------------------- DSL and table


def test_dual_softmax_matches_loops():
  rng = np.random.default_rng(3)
  sim = rng.normal(scale=0.3, size=(12, 8))
  temperature = 0.05
  ref = np.empty_like(sim)
  for i in range(12):
    for j in range(8):
      denom = sum(math.exp(sim[q, j] / temperature) for q in range(12))
      ref[i, j] = sim[i, j] * math.exp(sim[i, j] / temperature) / denom
  np.testing.assert_allclose(metrics.dual_softmax(sim, temperature), ref, rtol=1e-12)
  np.testing.assert_allclose(metrics.dual_softmax(sim.T, temperature, axis=1), ref.T, rtol=1e-12)
  # DSL metrics rank the re-scored matrices, under separate dsl/ keys.
  square = rng.normal(scale=0.3, size=(10, 10))
  res = metrics.dsl_retrieval_metrics(square, temperature=temperature)
  assert all(k.startswith("dsl/") for k in res)
  _assert_metrics_close(res, _brute_metrics(_brute_ranks(
      metrics.dual_softmax(square, temperature), range(10))), "dsl/t2v/")
  _assert_metrics_close(res, _brute_metrics(_brute_ranks(
      metrics.dual_softmax(square.T, temperature), range(10))), "dsl/v2t/")
  caption_video = np.arange(12) % 8
  res = metrics.dsl_retrieval_metrics(sim, caption_video, temperature=temperature)
  group = _brute_group_sim(sim, caption_video, 8)
  _assert_metrics_close(res, _brute_metrics(_brute_ranks(ref, caption_video)), "dsl/t2v/")
  _assert_metrics_close(res, _brute_metrics(_brute_ranks(
      metrics.dual_softmax(group, temperature), range(8))), "dsl/v2t/")


def test_dual_softmax_helps_a_hub_video():
  # Video 0 scores high for every text (a "hub"); DSL's prior over texts demotes it.
  sim = np.full((4, 4), 0.2) + 0.3 * np.eye(4)
  sim[:, 0] = 0.55
  assert metrics.retrieval_metrics(sim)["t2v/R@1"] == 25.0
  assert metrics.dsl_retrieval_metrics(sim)["dsl/t2v/R@1"] == 100.0


def test_format_table():
  res = metrics.retrieval_metrics(np.eye(20) + 0.01 * np.arange(20))
  res.update(metrics.dsl_retrieval_metrics(np.eye(20)))
  lines = metrics.format_table(res).splitlines()
  assert lines[0].split() == ["dir", "R@1", "R@5", "R@10", "MdR", "MnR"]
  assert [line.split()[0] for line in lines[2:]] == ["t2v", "v2t", "dsl/t2v", "dsl/v2t"]
  t2v = [float(x) for x in lines[2].split()[1:]]
  assert t2v == [round(res[f"t2v/{c}"], 1) for c in metrics.TABLE_COLUMNS]
  assert "StdR" not in lines[0]
  assert metrics.format_table({"t2v/R@1": 12.345}).splitlines()[2].split() == [
      "t2v", "12.3", "-", "-", "-", "-"]
  with pytest.raises(ValueError, match="no '<row>/<metric>' keys"):
    metrics.format_table({"loss": 1.0})


# ----------------------------------------------------------------------------- memory and errors


def test_msvd_sized_matrix_memory():
  # MSVD test: 27,700 captions x 670 videos. Ranking must not build anything near N x N x N; with
  # sorted captions not even a second copy of the matrix.
  rng = np.random.default_rng(0)
  n_video, n_cap = 670, 27_700
  caption_video = np.sort(np.concatenate([np.arange(n_video),
                                          rng.integers(0, n_video, n_cap - n_video)]))
  sim = rng.standard_normal((n_cap, n_video), dtype=np.float32)
  shuffled = rng.permutation(n_cap)
  sim_shuffled, caption_video_shuffled = sim[shuffled], caption_video[shuffled]
  peaks = {}
  tracemalloc.start()  # peaks below count only what the metric functions allocate
  try:
    res = metrics.retrieval_metrics(sim, caption_video, clip4clip_compat=True)
    peaks["sorted"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    res_shuffled = metrics.retrieval_metrics(sim_shuffled, caption_video_shuffled,
                                             clip4clip_compat=True)
    peaks["shuffled"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    dsl = metrics.dsl_retrieval_metrics(sim, caption_video)
    peaks["dsl"] = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peaks["sorted"] < 0.25 * sim.nbytes, peaks
  assert peaks["shuffled"] < 1.25 * sim.nbytes, peaks  # one sorted copy for the v2t max
  assert peaks["dsl"] < 1.25 * sim.nbytes, peaks  # one re-scored copy
  assert dsl["dsl/t2v/R@10"] < 3.0
  # Random scores: t2v around chance (R@10 ~ 10/670 = 1.5%).
  assert res == res_shuffled and res["t2v/R@10"] < 3.0


def test_bad_input_raises_clear_errors():
  with pytest.raises(ValueError, match="square"):
    metrics.retrieval_metrics(np.zeros((3, 4)))
  with pytest.raises(ValueError, match="2-D"):
    metrics.retrieval_metrics(np.zeros((2, 2, 2)))
  with pytest.raises(TypeError, match="real numbers"):
    metrics.retrieval_ranks(np.array([["a", "b"], ["c", "d"]]))
  with pytest.raises(ValueError, match=r"caption_video must be an int array of shape \(4,\)"):
    metrics.retrieval_metrics(np.zeros((4, 2)), np.array([0, 1]))
  with pytest.raises(ValueError, match=r"out of range \[0, 2\) at captions \[3\]"):
    metrics.retrieval_metrics(np.zeros((4, 2)), np.array([0, 1, 1, 2]))
  with pytest.raises(ValueError, match="1 videos have no caption"):
    metrics.retrieval_metrics(np.zeros((4, 3)), np.array([0, 1, 1, 0]))
  with pytest.raises(ValueError, match="temperature"):
    metrics.dual_softmax(np.zeros((2, 2)), temperature=0.0)
  with pytest.raises(ValueError, match="non-empty 1-D"):
    metrics.rank_metrics(np.array([], np.int64))
