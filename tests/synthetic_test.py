"""Synthetic set: single frames hide the direction, frame order reveals it; built by data_prep."""

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
from scipy import stats

from data_prep.synthetic import generate, render

# A config with every direction and plenty of clips, for the statistical checks (rendered small).
_STAT_CONFIG = generate.SyntheticConfig(num_train=800, num_val=0, num_test=0, seed=123)


def _centroids(spec: render.ClipSpec, num_frames: int = 8, resolution: int = 32) -> np.ndarray:
  frames = render.render_clip(spec, num_frames, resolution)
  return render.object_centroid(frames, render.BACKGROUNDS[spec.background])


@pytest.fixture(scope="module")
def stat_clips():
  specs = generate.make_specs(_STAT_CONFIG)["train"]
  return specs, np.stack([_centroids(s) for s in specs])  # [N, T, 2]


def test_single_frames_do_not_reveal_direction(stat_clips):
  """For each frame position t, object positions of left- vs right-moving clips (x) and up- vs
  down-moving clips (y) have the same distribution (two-sample KS test), so a single frame, known
  to be the first, middle or last, cannot tell the caption of a clip from its distractor's."""
  specs, cents = stat_clips
  direction = np.array([s.direction for s in specs])
  for a, b, axis in (("left", "right", 0), ("up", "down", 1)):
    xa, xb = cents[direction == a, :, axis], cents[direction == b, :, axis]
    assert len(xa) > 150 and len(xb) > 150
    for t in range(cents.shape[1]):
      result = stats.ks_2samp(xa[:, t], xb[:, t])
      # Balanced classes: the best single-threshold classifier's accuracy is 0.5 + D/2.
      assert result.pvalue > 1e-3, (a, b, t, result)
      assert 0.5 + result.statistic / 2 < 0.62, (a, b, t, result.statistic)


def test_frame_order_reveals_direction(stat_clips):
  """The mean wrapped displacement between consecutive frames gives every clip's direction."""
  specs, cents = stat_clips
  for spec, c in zip(specs, cents):
    d = render.wrapped_displacement(c)
    dx, dy = render.DIRECTIONS[spec.direction]
    if dx:
      assert np.sign(d[0]) == dx and abs(d[0]) > 5 * abs(d[1]), (spec, d)
    else:
      assert np.sign(d[1]) == dy and abs(d[1]) > 5 * abs(d[0]), (spec, d)


def test_reversed_clip_is_the_opposite_direction():
  """A left-moving clip played backwards is, pixel for pixel, a right-moving clip with another
  start: the unordered set of frames is the same for both directions (so meanP cannot solve it)."""
  left = render.ClipSpec("triangle", "red", "large", "gray", "left", (0.3, 0.7), 0.5)
  right = dataclasses.replace(left, direction="right", start=((0.3 - 0.5) % 1.0, 0.7))
  a = render.render_clip(left, 6, 48)[::-1]
  b = render.render_clip(right, 6, 48)
  assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_pairs_share_everything_but_direction():
  config = generate.SyntheticConfig(num_train=64, num_val=8, num_test=40, seed=5)
  specs = generate.make_specs(config)
  for split, clips in specs.items():
    assert len(clips) % 2 == 0 and len(clips) >= getattr(config, f"num_{split}")
    for a, b in zip(clips[0::2], clips[1::2]):
      assert (a.shape, a.colour, a.size, a.background) == (b.shape, b.colour, b.size, b.background)
      assert render.OPPOSITE[a.direction] == b.direction
      assert a.start != b.start  # independent starts
  # Fewer pairs than combinations: no two test pairs share their attributes.
  keys = [(s.shape, s.colour, s.size, s.background, s.direction) for s in specs["test"]]
  assert len(set(keys)) == len(keys)


def test_captions_name_every_attribute():
  rng = np.random.default_rng(0)
  spec = render.ClipSpec("diamond", "purple", "small", "teal", "up", (0.1, 0.2), 0.4)
  caps = generate.captions_for(spec, 3, rng)
  assert len(set(caps)) == 3
  for cap in caps:
    for word in ("diamond", "purple", "small", "teal"):
      assert word in cap, cap
    assert any(w in cap for w in ("up", "rises")), cap
    assert not any(w in cap for w in ("down", "left", "right", "sinks")), cap


def test_config_validation():
  with pytest.raises(ValueError, match="num_shapes"):
    generate.SyntheticConfig(num_shapes=99)
  with pytest.raises(ValueError, match="opposite"):
    generate.SyntheticConfig(directions=("left",))
  with pytest.raises(ValueError, match="video_resolution"):
    generate.SyntheticConfig(video_resolution=33)


_TINY = generate.SyntheticConfig(num_train=12, num_val=0, num_test=8, duration=4.0, fps=4,
                                 video_resolution=32, captions_per_video=2, seed=7)


def _tree_digest(raw_dir: str) -> str:
  h = hashlib.sha256()
  for name in sorted(os.listdir(os.path.join(raw_dir, "videos"))):
    with open(os.path.join(raw_dir, "videos", name), "rb") as f:
      h.update(name.encode() + f.read())
  with open(os.path.join(raw_dir, "annotations.json"), "rb") as f:
    h.update(f.read())
  return h.hexdigest()


def test_raw_tree_is_deterministic(tmp_path):
  """Same config: same bytes, rendered serially or in 2 processes; another seed: other bytes."""
  config = dataclasses.replace(_TINY, num_train=28)  # 36 clips: enough for the process pool
  a, b, c = (str(tmp_path / n) for n in "abc")
  generate.write_raw(config, a, progress=False, workers=1)
  generate.write_raw(config, b, progress=False, workers=2)
  generate.write_raw(dataclasses.replace(config, seed=8), c, progress=False, workers=1)
  assert _tree_digest(a) == _tree_digest(b)
  assert _tree_digest(a) != _tree_digest(c)
  with open(os.path.join(a, "annotations.json")) as f:
    ann = json.load(f)
  assert len(ann["videos"]) == 36 and len(ann["sentences"]) == 72
  with pytest.raises(ValueError, match="another config"):
    generate.write_raw(dataclasses.replace(config, seed=9), a, progress=False)


def test_builds_through_data_prep_and_motion_survives(tmp_path):
  """mp4 -> data_prep frame extraction -> TFDS -> VideoSplit: every decoded clip still moves in
  its annotated direction, and the captions are the annotation's."""
  from data_prep import build
  from tvr_jax.data import VideoSplit
  raw = str(tmp_path / "raw")
  generate.write_raw(_TINY, raw, progress=False)
  summary = build.build("synthetic", raw, str(tmp_path / "out"), num_frames=4, resolution=32,
                        workers=1, progress=False)
  assert summary["examples"] == {"train": 12, "test": 8}
  with open(os.path.join(raw, "annotations.json")) as f:
    ann = json.load(f)
  attrs = {v["video_id"]: v["attributes"] for v in ann["videos"]}
  captions = {}
  for s in ann["sentences"]:
    captions.setdefault(s["video_id"], []).append(s["caption"])
  for split_name in ("train", "test"):
    split = VideoSplit.open(str(tmp_path / "out"), split_name, dataset="synthetic",
                            progress=False)
    assert (split.num_frames, split.resolution) == (4, 32)
    for j, video_id in enumerate(split.video_ids):
      frames, mask = split.read_frames(j)
      assert frames.shape == (4, 32, 32, 3) and mask.tolist() == [1, 1, 1, 1]
      a = attrs[video_id]
      assert split.captions[j] == captions[video_id]
      d = render.wrapped_displacement(render.object_centroid(frames,
                                                             render.BACKGROUNDS[a["background"]]))
      dx, dy = render.DIRECTIONS[a["direction"]]
      axis, sign = (0, dx) if dx else (1, dy)
      assert np.sign(d[axis]) == sign and abs(d[axis]) > 0.05, (video_id, a, d)
