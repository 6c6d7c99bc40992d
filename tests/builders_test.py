"""The four dataset builders on miniature raw trees (tests/raw_fixtures.py), bad input included."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import REPO_ROOT
import data_prep
from data_prep import base
from data_prep import build as build_lib
from data_prep import frames as frames_lib
import raw_fixtures as rf

F, R = 4, 32
OPTIONS = dict(num_frames=F, resolution=R, workers=1, progress=False)


def _examples(data_dir, dataset, split):
  """{video_id: example} of a built split, read back through data_prep.load_split."""
  source = data_prep.load_split(data_dir, dataset, split)
  out = {}
  for i in range(len(source)):
    ex = source[i]
    out[ex["video_id"].decode()] = ex
  return out


def _captions(ex):
  return [c.decode() for c in ex["captions"]]


def _check_frames(ex, seconds_kept, num_real):
  """Frame shapes, mask, and which source seconds were kept (red channel = frame_red(10 * s))."""
  assert len(ex["frames"]) == F
  for frame in ex["frames"]:
    assert frame.shape == (R, R, 3) and frame.dtype == np.uint8
  np.testing.assert_array_equal(ex["frame_mask"], [1] * num_real + [0] * (F - num_real))
  assert ex["frame_mask"].dtype == np.int32
  for frame, second in zip(ex["frames"], seconds_kept):
    assert abs(frame[..., 0].mean() - rf.frame_red(rf.VIDEO_RATE * second)) < 6, second
  for frame in ex["frames"][num_real:]:
    assert frame.max() <= 1  # black padding


def _by_kind(summary, split=None):
  skipped = summary["skipped"]
  return skipped["by_kind"] if split is None else skipped["by_split"].get(split, {})


def test_msrvtt(tmp_path):
  raw = rf.make_msrvtt(str(tmp_path / "raw"))
  out = str(tmp_path / "out")
  summary = build_lib.build("msrvtt", raw, out, **OPTIONS)
  assert summary["examples"] == {"train": 3, "test": 1}
  assert _by_kind(summary, "train") == {
      "malformed_annotation": 2, "non_utf8_caption": 1, "empty_caption": 1, "missing": 1,
      "truncated": 1, "empty": 1}
  assert _by_kind(summary, "test") == {"empty_caption": 1, "no_valid_caption": 1}
  where = {(r["kind"], os.path.basename(r["where"])) for r in summary["skipped"]["records"]}
  assert ("truncated", "video3.mp4") in where and ("empty", "video4.mp4") in where
  assert ("missing", "MSRVTT_train.9k.csv:video5") in where

  train = _examples(out, "msrvtt", "train")
  assert sorted(train) == ["video0", "video1", "video2"]
  assert _captions(train["video0"]) == ["a dog runs", "a dog plays"]
  assert _captions(train["video1"]) == ["a man cooks", "a man talks"]
  assert _captions(train["video2"]) == ["a cat sleeps"]
  _check_frames(train["video0"], [0, 1, 2], 3)        # 3 s -> 3 frames, 1 padded
  _check_frames(train["video1"], [0, 1, 2, 4], 4)     # 5 s -> seconds 0..4, uniform 4 of 5
  _check_frames(train["video2"], [0, 1], 2)
  assert train["video1"]["duration"] == pytest.approx(5.0)
  assert "timestamps" not in train["video1"]
  test = _examples(out, "msrvtt", "test")
  assert sorted(test) == ["video6"] and _captions(test["video6"]) == ["a girl sings"]
  _check_frames(test["video6"], [0, 1, 2, 3], 4)

  # The summary is written beside the dataset; a second call reuses the build.
  path = os.path.join(summary["data_path"], build_lib.SUMMARY_FILE)
  with open(path) as f:
    assert json.load(f)["examples"] == {"train": 3, "test": 1}
  again = build_lib.build("msrvtt", raw, out, **OPTIONS)
  assert again["reused"] and again["examples"] == summary["examples"]


def test_msvd_through_the_command_line(tmp_path, capsys):
  raw = rf.make_msvd(str(tmp_path / "raw"))
  out = str(tmp_path / "out")
  rc = build_lib.main(["msvd", f"--manual_dir={raw}", f"--data_dir={out}", f"--num_frames={F}",
                       f"--resolution={R}", "--workers=1", "--no_progress"])
  printed = capsys.readouterr().out
  assert rc == 0
  assert "train: 2 examples" in printed and "test: 1 examples" in printed
  assert "missing=1" in printed and "clipF" in printed
  with open(os.path.join(out, "msvd", f"f{F}_r{R}_fps1_q95", "1.0.0",
                         build_lib.SUMMARY_FILE)) as f:
    summary = json.load(f)
  assert summary["examples"] == {"train": 2, "val": 1, "test": 1}
  assert _by_kind(summary, "train") == {"non_utf8_caption": 1, "empty": 1}
  assert _by_kind(summary, "test") == {"missing": 1, "malformed_annotation": 1}
  train = _examples(out, "msvd", "train")
  assert _captions(train["clipA"]) == ["a man plays guitar", "a man sings"]
  assert _captions(train["clipB"]) == ["someone dances"]
  _check_frames(train["clipA"], [0, 1, 2], 3)
  assert _captions(_examples(out, "msvd", "val")["clipD"]) == ["a cat"]
  test = _examples(out, "msvd", "test")
  assert _captions(test["clipE"]) == ["a car drives", "a red car"]
  _check_frames(test["clipE"], [0, 1, 2, 3], 4)


class _Hostile:
  """Pickles to a call of os.system: loading it with plain pickle would create the marker file."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_msvd_hostile_pickle_is_not_executed(tmp_path):
  marker = tmp_path / "pwned"
  payload = pickle.dumps({"clipA": [["a"]], "evil": _Hostile(str(marker))})
  raw = rf.make_msvd(str(tmp_path / "raw"), captions_pickle=payload)
  with pytest.raises(base.RawDataError, match=r"raw-captions\.pkl.*refusing to load global"):
    build_lib.build("msvd", raw, str(tmp_path / "out"), **OPTIONS)
  assert not marker.exists()
  assert not os.path.exists(tmp_path / "out" / "msvd" / f"f{F}_r{R}_fps1_q95" / "1.0.0")


def test_didemo(tmp_path):
  raw = rf.make_didemo(str(tmp_path / "raw"))
  out = str(tmp_path / "out")
  summary = build_lib.build("didemo", raw, out, **OPTIONS)
  assert summary["examples"] == {"train": 2, "val": 1, "test": 1}
  assert _by_kind(summary, "train") == {"malformed_annotation": 2, "empty_caption": 1,
                                        "missing": 1}
  assert _by_kind(summary, "test") == {"empty": 1}
  train = _examples(out, "didemo", "train")
  v1 = train["v1.mov"]
  assert _captions(v1) == ["a dog appears", "the dog jumps"]  # time order
  np.testing.assert_allclose(v1["timestamps"], [[0.0, 5.0], [5.0, 12.5]])
  assert v1["timestamps"].dtype == np.float32
  _check_frames(v1, [0, 1, 3, 5], 4)  # 6 s -> seconds 0..5; int(linspace(0, 5, 4)) = 0, 1, 3, 5
  assert v1["duration"] == pytest.approx(6.0)
  assert _captions(train["v2.mp4"]) == ["a ball"]  # found as the transcoded v2.mp4.mp4
  np.testing.assert_allclose(train["v2.mp4"]["timestamps"], [[0.0, 10.0]])
  val = _examples(out, "didemo", "val")["v4.avi"]
  np.testing.assert_allclose(val["timestamps"], [[35 / 3, 20.0]], rtol=1e-6)
  _check_frames(val, [0, 1], 2)
  assert sorted(_examples(out, "didemo", "test")) == ["v6.mp4"]


def test_activitynet_with_worker_processes(tmp_path):
  raw = rf.make_activitynet(str(tmp_path / "raw"))
  out = str(tmp_path / "out")
  summary = build_lib.build("activitynet", raw, out, **{**OPTIONS, "workers": 2})
  assert summary["examples"] == {"train": 2, "val": 1}
  assert _by_kind(summary, "train") == {"malformed_annotation": 1, "duplicate_video": 1,
                                        "missing": 1}
  assert _by_kind(summary, "val") == {"non_utf8_caption": 1, "truncated": 1}
  train = _examples(out, "activitynet", "train")
  aaa = train["v_aaa"]
  assert _captions(aaa) == ["A man walks.", "then he sits."]  # time order, stripped
  np.testing.assert_allclose(aaa["timestamps"], [[0.0, 2.5], [2.0, 4.0]])
  _check_frames(aaa, [0, 1, 2, 4], 4)
  assert _captions(train["v_bbb"]) == ["A ball rolls."]  # file bbb.mp4 (no "v_")
  _check_frames(train["v_bbb"], [0, 1, 2], 3)
  val = _examples(out, "activitynet", "val")
  assert _captions(val["v_eee"]) == ["A bird sings."]
  np.testing.assert_allclose(val["v_eee"]["timestamps"], [[0.0, 2.0]])


def test_missing_manual_dir_and_annotation_files_stop_at_once(tmp_path, capsys):
  out = str(tmp_path / "out")
  with pytest.raises(base.RawDataError, match="manual directory .*nowhere does not exist"):
    build_lib.build("msrvtt", str(tmp_path / "nowhere"), out, **OPTIONS)
  rc = build_lib.main(["didemo", f"--manual_dir={tmp_path / 'nowhere'}", f"--data_dir={out}"])
  err = capsys.readouterr().err
  assert rc == 2 and "does not exist" in err and "LocalizingMoments" in err

  raw = rf.make_msrvtt(str(tmp_path / "msrvtt"))
  os.remove(os.path.join(raw, "msrvtt_data", "MSRVTT_JSFUSION_test.csv"))
  with pytest.raises(base.RawDataError, match="MSRVTT_JSFUSION_test.csv is missing"):
    build_lib.build("msrvtt", raw, out, **OPTIONS)
  anet = str(tmp_path / "anet")
  os.makedirs(anet)
  with pytest.raises(base.RawDataError, match=r"(?s)train_ids\.json is missing.*densevid"):
    build_lib.build("activitynet", anet, out, **OPTIONS)
  assert not os.path.exists(os.path.join(out, "msrvtt", f"f{F}_r{R}_fps1_q95", "1.0.0"))


def test_unparseable_annotation_file_names_the_file(tmp_path):
  raw = rf.make_didemo(str(tmp_path / "raw"))
  with open(os.path.join(raw, "val_data.json"), "w") as f:
    f.write("[{not json")
  with pytest.raises(base.RawDataError, match=r"val_data\.json is not valid JSON"):
    build_lib.build("didemo", raw, str(tmp_path / "out"), **OPTIONS)


def test_split_with_no_usable_video_stops_clearly(tmp_path):
  raw = rf.make_msrvtt(str(tmp_path / "raw"))
  os.remove(os.path.join(raw, "MSRVTT_Videos", "video6.mp4"))  # the only valid test video
  with pytest.raises(base.RawDataError, match="split 'test' has no usable video"):
    build_lib.build("msrvtt", raw, str(tmp_path / "out"), **OPTIONS)


def _incomplete_dirs(out):
  config_dir = os.path.join(out, "msrvtt", f"f{F}_r{R}_fps1_q95")
  if not os.path.isdir(config_dir):
    return []
  return [d for d in os.listdir(config_dir) if d.startswith("incomplete.")]


def test_exception_mid_build_then_rerun_gives_complete_dataset(tmp_path, monkeypatch):
  raw = rf.make_msrvtt(str(tmp_path / "raw"))
  out = str(tmp_path / "out")
  real = frames_lib.extract_frames
  calls = []

  def failing(path, *args, **kwargs):
    calls.append(path)
    if len(calls) == 3:
      raise RuntimeError("simulated crash")
    return real(path, *args, **kwargs)

  monkeypatch.setattr(frames_lib, "extract_frames", failing)
  with pytest.raises(RuntimeError, match="simulated crash"):
    build_lib.build("msrvtt", raw, out, **OPTIONS)
  assert not os.path.exists(os.path.join(out, "msrvtt", f"f{F}_r{R}_fps1_q95", "1.0.0"))
  monkeypatch.setattr(frames_lib, "extract_frames", real)
  summary = build_lib.build("msrvtt", raw, out, **OPTIONS)
  assert summary["examples"] == {"train": 3, "test": 1}
  assert sorted(_examples(out, "msrvtt", "train")) == ["video0", "video1", "video2"]
  assert _incomplete_dirs(out) == []


def test_killed_build_then_rerun_gives_complete_dataset(tmp_path):
  raw = rf.make_msrvtt(str(tmp_path / "raw"))
  out = str(tmp_path / "out")
  started = tmp_path / "started"
  # The child writes the train split, then hangs on the test split's video until it is killed.
  script = textwrap.dedent(f"""
      import time
      from data_prep import build, frames
      real = frames.extract_frames
      def slow(path, *args, **kwargs):
        if path.endswith("video6.mp4"):
          open({str(started)!r}, "w").close()
          time.sleep(600)
        return real(path, *args, **kwargs)
      frames.extract_frames = slow
      build.build("msrvtt", {raw!r}, {out!r}, num_frames={F}, resolution={R}, workers=1,
                  progress=False)
      """)
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  child = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO_ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.time() + 120
    while not started.exists():
      if child.poll() is not None:
        pytest.fail(f"child ended early: {child.stderr.read().decode()[-3000:]}")
      assert time.time() < deadline, "child never reached the test split"
      time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
  finally:
    if child.poll() is None:
      child.kill()
    child.stderr.close()
  assert len(_incomplete_dirs(out)) == 1  # the half-written build
  assert not os.path.exists(os.path.join(out, "msrvtt", f"f{F}_r{R}_fps1_q95", "1.0.0"))
  summary = build_lib.build("msrvtt", raw, out, **OPTIONS)
  assert summary["examples"] == {"train": 3, "test": 1}
  assert len(summary["removed_incomplete"]) == 1
  assert _incomplete_dirs(out) == []
  test = _examples(out, "msrvtt", "test")
  assert sorted(test) == ["video6"]
  _check_frames(test["video6"], [0, 1, 2, 3], 4)
