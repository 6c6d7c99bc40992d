"""Frame extraction checked against a direct PyAV + Pillow computation written out by hand here."""

import io
import os

import av
import numpy as np
from PIL import Image
import pytest

from data_prep import frames
import raw_fixtures as rf


def _decode_all(path):
  """Reference decode: every frame as uint8 [H, W, 3] RGB (PyAV's own rgb24 conversion)."""
  with av.open(path) as container:
    return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def _reference(frame, box_size, crop_box):
  """Reference resize + crop with explicit sizes: Pillow bicubic to `box_size`, then `crop_box`."""
  return np.asarray(Image.fromarray(frame).resize(box_size, Image.BICUBIC).crop(crop_box))


def _jpeg_to_array(data):
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  d = tmp_path_factory.mktemp("videos")
  return {
      "5_5s": rf.write_video(str(d / "a.mp4"), 5.5),   # 55 frames at 10 fps
      "12s": rf.write_video(str(d / "b.avi"), 12),     # mpeg4 in AVI
      "2s": rf.write_video(str(d / "c.mp4"), 2),
      "portrait": rf.write_video(str(d / "p.mp4"), 3, width=48, height=64),
      "truncated": rf.write_truncated_video(str(d / "t.mp4")),
      "empty": rf.write_empty_file(str(d / "e.mp4")),
      "garbage": _write_bytes(str(d / "g.avi"), b"RIFF" + bytes(range(256)) * 8),
      "dir": str(d),
  }


def _write_bytes(path, data):
  with open(path, "wb") as f:
    f.write(data)
  return path


def test_samples_one_frame_per_second_resized_and_cropped_exactly(videos):
  sampled, duration = frames.sample_frames(videos["5_5s"], fps=1.0, resolution=32)
  ref_all = _decode_all(videos["5_5s"])
  assert len(ref_all) == 55
  # 1 fps -> t = 0, 1, ..., 5 s -> source frames 0, 10, ..., 50.
  assert len(sampled) == 6
  # 64x48 -> short side 48 -> 32: (int(32 * 64 / 48), 32) = (42, 32); left = round(10 / 2) = 5.
  for i, image in enumerate(sampled):
    expected = _reference(ref_all[10 * i], (42, 32), (5, 0, 37, 32))
    np.testing.assert_array_equal(np.asarray(image), expected)
  assert duration == pytest.approx(5.5)


def test_fps_is_configurable(videos):
  sampled, _ = frames.sample_frames(videos["5_5s"], fps=2.0, resolution=16)
  ref_all = _decode_all(videos["5_5s"])
  assert len(sampled) == 11  # t = 0, 0.5, ..., 5.0 -> frames 0, 5, ..., 50
  # (int(16 * 64 / 48), 16) = (21, 16); left = round(5 / 2) = 2 (Python rounds half to even).
  for i, image in enumerate(sampled):
    np.testing.assert_array_equal(np.asarray(image),
                                  _reference(ref_all[5 * i], (21, 16), (2, 0, 18, 16)))


def test_portrait_video_resizes_width_and_crops_height(videos):
  sampled, _ = frames.sample_frames(videos["portrait"], fps=1.0, resolution=24)
  ref_all = _decode_all(videos["portrait"])
  # 48x64 (W x H): short side is the width -> (24, int(24 * 64 / 48)) = (24, 32); top = 4.
  assert len(sampled) == 3
  for i, image in enumerate(sampled):
    np.testing.assert_array_equal(np.asarray(image),
                                  _reference(ref_all[10 * i], (24, 32), (0, 4, 24, 28)))


def test_uniform_subsampling_of_longer_videos(videos):
  # CLIP4Clip: np.linspace(0, n - 1, num=F, dtype=int); written out for n = 12, F = 4.
  np.testing.assert_array_equal(frames.uniform_indices(12, 4), [0, 3, 7, 11])
  np.testing.assert_array_equal(frames.uniform_indices(3, 4), [0, 1, 2])
  for n, f in [(100, 12), (65, 64), (13, 12), (7, 7)]:
    np.testing.assert_array_equal(frames.uniform_indices(n, f),
                                  np.linspace(0, n - 1, num=f, dtype=int))
  options = frames.FrameOptions(fps=1.0, num_frames=4, resolution=32, jpeg_quality=95)
  out = frames.extract_frames(videos["12s"], options)
  ref_all = _decode_all(videos["12s"])
  assert out.num_sampled == 12
  np.testing.assert_array_equal(out.mask, [1, 1, 1, 1])
  assert out.mask.dtype == np.int32
  # Sampled seconds 0, 3, 7, 11 -> source frames 0, 30, 70, 110; JPEG adds small noise only.
  for data, k in zip(out.frames, [0, 30, 70, 110]):
    got = _jpeg_to_array(data).astype(np.float32)
    expected = _reference(ref_all[k], (42, 32), (5, 0, 37, 32)).astype(np.float32)
    assert got.shape == (32, 32, 3)
    assert np.abs(got - expected).mean() < 2.0
  assert out.duration == pytest.approx(12.0)


def test_short_video_is_padded_with_masked_black_frames(videos):
  options = frames.FrameOptions(fps=1.0, num_frames=5, resolution=32)
  out = frames.extract_frames(videos["2s"], options)
  np.testing.assert_array_equal(out.mask, [1, 1, 0, 0, 0])
  assert len(out.frames) == 5
  for data in out.frames[2:]:
    assert _jpeg_to_array(data).max() <= 1
  # Real frames are not black: frame 10 has red 100.
  assert abs(_jpeg_to_array(out.frames[1])[..., 0].mean() - rf.frame_red(10)) < 6


def test_time_window_limits_sampling(videos):
  sampled, duration = frames.sample_frames(videos["5_5s"], fps=1.0, resolution=16,
                                           window=(1.0, 3.0))
  ref_all = _decode_all(videos["5_5s"])
  assert len(sampled) == 3  # t = 1, 2, 3 (end inclusive, as CLIP4Clip)
  for image, k in zip(sampled, [10, 20, 30]):
    np.testing.assert_array_equal(np.asarray(image),
                                  _reference(ref_all[k], (21, 16), (2, 0, 18, 16)))
  assert duration == pytest.approx(5.5)  # the whole video's, from the container
  with pytest.raises(frames.VideoError) as e:
    frames.sample_frames(videos["5_5s"], fps=1.0, resolution=16, window=(8.0, 9.0))
  assert e.value.kind == "empty"


@pytest.mark.parametrize("name,kind", [("missing", "missing"), ("empty", "empty"),
                                       ("garbage", "undecodable"), ("truncated", "truncated")])
def test_bad_videos_raise_typed_errors(videos, name, kind):
  path = os.path.join(videos["dir"], "nope.mp4") if name == "missing" else videos[name]
  with pytest.raises(frames.VideoError) as e:
    frames.extract_frames(path, frames.FrameOptions(num_frames=4, resolution=16))
  assert e.value.kind == kind
  assert e.value.path == path
  assert path in str(e.value)


def test_extract_many_in_worker_processes_matches_in_process(videos):
  options = frames.FrameOptions(fps=1.0, num_frames=3, resolution=16)
  jobs = [("a", videos["5_5s"], None), ("e", videos["empty"], None), ("c", videos["2s"], None),
          ("w", videos["5_5s"], (2.0, 4.0))]
  serial = dict(frames.extract_many(jobs, options, workers=1, progress=False))
  parallel = dict(frames.extract_many(jobs, options, workers=2, progress=False))
  assert sorted(parallel) == ["a", "c", "e", "w"]
  for key in ("a", "c", "w"):
    assert parallel[key].frames == serial[key].frames
    np.testing.assert_array_equal(parallel[key].mask, serial[key].mask)
  assert isinstance(parallel["e"], frames.VideoError) and parallel["e"].kind == "empty"
  np.testing.assert_array_equal(serial["c"].mask, [1, 1, 0])


def test_resized_size_follows_torchvision_rule():
  assert frames.resized_size(64, 48, 32) == (42, 32)
  assert frames.resized_size(48, 64, 24) == (24, 32)
  assert frames.resized_size(320, 240, 224) == (298, 224)
  assert frames.resized_size(100, 100, 224) == (224, 224)


def test_bad_options_are_rejected():
  with pytest.raises(ValueError, match="num_frames"):
    frames.FrameOptions(num_frames=0)
  with pytest.raises(ValueError, match="jpeg_quality"):
    frames.FrameOptions(jpeg_quality=100)
  with pytest.raises(ValueError, match="kind"):
    frames.VideoError("weird", "x.mp4")
