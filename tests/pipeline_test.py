"""Input pipeline over a tiny synthetic set built through data_prep (the real builder path)."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from data_prep.synthetic import generate
from tvr_jax.data import EvalData, FrameCache, TrainIterator, VideoSplit
from tvr_jax.tokenizer import tokenize

F, R, L = 4, 32, 16
# 24 train videos x 3 captions = 72 "all" examples; 10 test videos x 3 = 30 captions.
_CONFIG = generate.SyntheticConfig(num_train=24, num_val=0, num_test=10, duration=4.0, fps=2,
                                   video_resolution=32, captions_per_video=3, seed=11)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from data_prep import build
  root = tmp_path_factory.mktemp("pipeline")
  generate.write_raw(_CONFIG, str(root / "raw"), progress=False)
  build.build("synthetic", str(root / "raw"), str(root / "out"), num_frames=F, resolution=R,
              workers=1, progress=False)
  return str(root / "out")


@pytest.fixture(scope="module")
def train_split(data_dir):
  return VideoSplit.open(data_dir, "train", dataset="synthetic", progress=False)


@pytest.fixture(scope="module")
def test_split(data_dir):
  return VideoSplit.open(data_dir, "test", dataset="synthetic", progress=False)


def _iterator(split, **kw):
  args = dict(global_batch_size=8, caption_mode="all", context_length=L, seed=0)
  args.update(kw)
  return TrainIterator(split, **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_batch_shapes_dtypes_and_content(train_split):
  it = _iterator(train_split)
  assert it.steps_per_epoch == 72 // 8
  for batch in _take(it, 3):
    assert set(batch) == {"frames", "frame_mask", "text_ids", "video_index", "caption_index"}
    assert batch["frames"].shape == (8, F, R, R, 3) and batch["frames"].dtype == np.uint8
    assert batch["frame_mask"].shape == (8, F) and batch["frame_mask"].dtype == np.int32
    assert batch["text_ids"].shape == (8, L) and batch["text_ids"].dtype == np.int32
    assert batch["video_index"].dtype == np.int32 and batch["caption_index"].dtype == np.int32
    flat = [c for caps in train_split.captions for c in caps]
    for row in range(8):
      j = int(batch["video_index"][row])
      frames, mask = train_split.read_frames(j)
      np.testing.assert_array_equal(batch["frames"][row], frames)
      np.testing.assert_array_equal(batch["frame_mask"][row], mask)
      text = flat[int(batch["caption_index"][row])]
      assert text in train_split.captions[j]
      np.testing.assert_array_equal(batch["text_ids"][row], tokenize([text], L)[0])


def test_all_mode_epoch_visits_every_caption_once(train_split):
  it = _iterator(train_split, seed=3)
  epoch = _take(it, it.steps_per_epoch)
  seen = np.concatenate([b["caption_index"] for b in epoch])
  assert sorted(seen.tolist()) == list(range(72))
  second = np.concatenate([b["caption_index"] for b in _take(it, it.steps_per_epoch)])
  assert sorted(second.tolist()) == list(range(72))
  assert not np.array_equal(seen, second)  # reshuffled each epoch


def test_random_and_paragraph_modes(train_split):
  it = _iterator(train_split, caption_mode="random", seed=1)
  assert it.steps_per_epoch == 24 // 8
  batches = _take(it, 2 * it.steps_per_epoch)
  flat = [c for caps in train_split.captions for c in caps]
  drawn = []
  for epoch in (batches[:3], batches[3:]):
    videos = np.concatenate([b["video_index"] for b in epoch])
    assert sorted(videos.tolist()) == list(range(24))  # every video once per epoch
    for b in epoch:
      for j, c, ids in zip(b["video_index"], b["caption_index"], b["text_ids"]):
        assert flat[c] in train_split.captions[j]
        np.testing.assert_array_equal(ids, tokenize([flat[c]], L)[0])
        drawn.append(int(c))
  assert len(set(drawn)) > 24  # different captions of the same videos get drawn
  it = _iterator(train_split, caption_mode="paragraph", context_length=64)
  b = next(it)
  for j, ids, c in zip(b["video_index"], b["text_ids"], b["caption_index"]):
    np.testing.assert_array_equal(ids, tokenize([" ".join(train_split.captions[j])], 64)[0])
    assert c == -1


def test_same_seed_same_batches_other_seed_other_batches(train_split):
  a = _take(_iterator(train_split, seed=5, caption_mode="random"), 4)
  b = _take(_iterator(train_split, seed=5, caption_mode="random"), 4)
  c = _take(_iterator(train_split, seed=6, caption_mode="random"), 4)
  assert _same(a, b)
  assert not _same(a, c)


def test_state_restore_resumes_with_the_next_batch(train_split):
  it = _iterator(train_split, seed=2)
  _take(it, 5)  # crosses no epoch yet; then state mid-epoch 1 after more steps
  state = json.loads(json.dumps(it.get_state()))  # survives a JSON round trip (Orbax JsonSave)
  expected = _take(it, 7)  # runs into the second epoch
  fresh = _iterator(train_split, seed=2)
  fresh.set_state(state)
  assert fresh.step == 5
  assert _same(_take(fresh, 7), expected)
  with pytest.raises(ValueError, match="seed"):
    _iterator(train_split, seed=9).set_state(state)
  with pytest.raises(ValueError, match="global_batch_size"):
    _iterator(train_split, seed=2, global_batch_size=4).set_state(state)


def test_worker_processes_and_state(train_split):
  """Grain worker processes: deterministic, and the state resumes exactly (2 workers)."""
  with _iterator(train_split, seed=4, worker_count=2) as it:
    first = _take(it, 3)
    state = it.get_state()
    expected = _take(it, 3)
  with _iterator(train_split, seed=4, worker_count=2) as again:
    assert _same(_take(again, 3), first)
    again.set_state(state)
    assert _same(_take(again, 3), expected)
  epoch = first + expected  # 6 batches of 8 out of 9 per epoch: no caption twice
  seen = np.concatenate([b["caption_index"] for b in epoch])
  assert len(set(seen.tolist())) == 48


def test_processes_read_disjoint_shares(train_split):
  shares = []
  for p in range(2):
    it = _iterator(train_split, caption_mode="random", process_index=p, process_count=2)
    assert it.local_batch_size == 4 and it.steps_per_epoch == 3
    batches = _take(it, it.steps_per_epoch)
    assert all(b["frames"].shape[0] == 4 for b in batches)
    shares.append(set(np.concatenate([b["video_index"] for b in batches]).tolist()))
  assert shares[0].isdisjoint(shares[1])
  assert shares[0] | shares[1] == set(range(24))
  with pytest.raises(ValueError, match="multiple"):
    _iterator(train_split, global_batch_size=9, process_index=0, process_count=2)


def test_frame_cache_gives_identical_batches(train_split, tmp_path):
  cache = FrameCache.fill(train_split, root=str(tmp_path), progress=False)
  assert cache.path.startswith(str(tmp_path))
  for j in (0, 7, 23):
    for x, y in zip(cache.read_frames(j), train_split.read_frames(j)):
      np.testing.assert_array_equal(x, y)
  again = FrameCache.fill(train_split, root=str(tmp_path), progress=False)  # reused, not refilled
  assert again.path == cache.path
  a = _take(_iterator(train_split, seed=8), 3)
  b = _take(_iterator(train_split, seed=8, cache=cache), 3)
  assert _same(a, b)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_video_and_caption_once(test_split, process_count):
  assert test_split.num_videos == 10 and test_split.num_captions == 30
  videos, captions = [], []
  for p in range(process_count):
    data = EvalData(test_split, global_batch_size=8, caption_mode="all", context_length=L,
                    process_index=p, process_count=process_count)
    assert data.num_video_batches == 2 and data.num_caption_batches == 4
    vb = list(data.video_batches())
    cb = list(data.caption_batches())
    assert len(vb) == 2 and len(cb) == 4
    for b in vb:
      assert b["frames"].shape == (8 // process_count, F, R, R, 3)
      assert b["valid"].dtype == np.bool_
      np.testing.assert_array_equal(b["valid"], b["video_index"] >= 0)
      for row in np.nonzero(b["valid"])[0]:
        np.testing.assert_array_equal(b["frames"][row],
                                      test_split.read_frames(b["video_index"][row])[0])
      videos += b["video_index"][b["valid"]].tolist()
    for b in cb:
      np.testing.assert_array_equal(b["valid"], b["caption_index"] >= 0)
      for i, j, ids in zip(b["caption_index"][b["valid"]], b["video_index"][b["valid"]],
                           b["text_ids"][b["valid"]]):
        assert data.caption_to_video[i] == j
        assert data.texts[i] in test_split.captions[j]
        np.testing.assert_array_equal(ids, tokenize([data.texts[i]], L)[0])
      assert (b["video_index"][~b["valid"]] == -1).all()
      captions += b["caption_index"][b["valid"]].tolist()
  assert sorted(videos) == list(range(10))
  assert sorted(captions) == list(range(30))
  np.testing.assert_array_equal(np.bincount(data.caption_to_video), [3] * 10)


def test_eval_paragraph_mode(test_split):
  data = EvalData(test_split, global_batch_size=4, caption_mode="paragraph", context_length=64)
  assert data.num_captions == 10
  batches = list(data.caption_batches())
  assert sum(int(b["valid"].sum()) for b in batches) == 10
  b = batches[0]
  np.testing.assert_array_equal(b["video_index"], b["caption_index"])
  np.testing.assert_array_equal(
      b["text_ids"][0], tokenize([" ".join(test_split.captions[int(b["video_index"][0])])], 64)[0])


@pytest.mark.devices(8)
def test_global_arrays_on_8_devices(data_dir):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  split = VideoSplit.open(data_dir, "train", dataset="synthetic", progress=False)
  kw = dict(global_batch_size=16, caption_mode="all", context_length=L, seed=1)
  host = next(TrainIterator(split, **kw))
  dev = next(TrainIterator(split, sharding=sharding, **kw))
  for k, v in dev.items():
    assert isinstance(v, jax.Array) and v.shape == host[k].shape, (k, v.shape)
    assert v.sharding == sharding, (k, v.sharding)
    assert len(v.addressable_shards) == 8 and v.addressable_shards[0].data.shape[0] == 2
    np.testing.assert_array_equal(np.asarray(v), host[k])
  test = VideoSplit.open(data_dir, "test", dataset="synthetic", progress=False)
  ev = EvalData(test, global_batch_size=8, caption_mode="all", context_length=L,
                sharding=sharding)
  vb = list(ev.video_batches())
  assert vb[-1]["valid"].shape == (8,) and int(vb[-1]["valid"].sum()) == 2
  result = {"ok": True, "frames": list(dev["frames"].shape)}
  assert result == {"ok": True, "frames": [16, F, R, R, 3]}


def test_bad_inputs_fail_clearly(data_dir, train_split, tmp_path):
  with pytest.raises(FileNotFoundError, match="dataset_info.json"):
    VideoSplit.open(str(tmp_path), "train")
  with pytest.raises(ValueError, match="no split 'nope'"):
    VideoSplit.open(data_dir, "nope", dataset="synthetic", progress=False)
  with pytest.raises(ValueError, match="caption_mode"):
    _iterator(train_split, caption_mode="some")
  with pytest.raises(ValueError, match="seed"):
    _iterator(train_split, seed=-1)
  with pytest.raises(ValueError, match="fewer than one local batch"):
    _iterator(train_split, caption_mode="random", global_batch_size=32)
