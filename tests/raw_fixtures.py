"""Miniature raw dataset trees in the original layouts, with real encoded videos (PyAV).

Each `make_*` writes a tree with a few good videos and one of each bad input the builders must
skip and count; the docstring lists exactly what is in it, and builders_test.py checks the result
against that list. Videos are 64x48 (W x H) at 10 fps; frame k of a video has red channel
`frame_red(k)` everywhere, so a decoded frame tells which source frame was sampled.
"""

from __future__ import annotations

import json
import os
import pickle

import av
import numpy as np

VIDEO_RATE = 10  # source frames per second
WIDTH, HEIGHT = 64, 48


def frame_red(k: int) -> int:
  """Red value of source frame k (distinct for k < 25, far apart so JPEG noise cannot blur them)."""
  return (10 * k) % 250


def video_frame(k: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
  """Source frame k: uint8 [H, W, 3]; red = frame_red(k), green/blue = fixed gradients."""
  img = np.zeros((height, width, 3), np.uint8)
  img[..., 0] = frame_red(k)
  img[..., 1] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
  img[..., 2] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
  return img


def write_video(path: str, seconds: float, rate: int = VIDEO_RATE, width: int = WIDTH,
                height: int = HEIGHT, noise: bool = False, faststart: bool = False) -> str:
  """Encodes a `seconds`-long video at `path` (libx264 for .mp4, mpeg4 for .avi)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  codec = "mpeg4" if path.endswith(".avi") else "libx264"
  options = {"movflags": "faststart"} if faststart else {}
  rng = np.random.default_rng(0)
  with av.open(path, "w", options=options) as container:
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    if codec == "libx264":
      stream.options = {"crf": "10"}
    else:
      stream.bit_rate = 2_000_000
    for k in range(int(round(seconds * rate))):
      img = (rng.integers(0, 256, (height, width, 3), dtype=np.uint8) if noise
             else video_frame(k, width, height))
      for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return path


def write_truncated_video(path: str) -> str:
  """A video cut off part-way: a faststart mp4 (index first) whose data stops at 55%."""
  write_video(path, 4, noise=True, faststart=True)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: int(len(data) * 0.55)])
  return path


def write_empty_file(path: str) -> str:
  """A zero-length video file."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  open(path, "wb").close()
  return path


def write_json_bytes(path: str, obj, replace: dict[str, bytes] | None = None) -> None:
  """Writes `obj` as UTF-8 JSON; each `replace` key in the text becomes the given raw bytes.

  That is how a non-UTF-8 caption gets into an otherwise valid annotation file.
  """
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
  for marker, raw in (replace or {}).items():
    data = data.replace(marker.encode("utf-8"), raw)
  with open(path, "wb") as f:
    f.write(data)


BAD_BYTES = b"caf\xe9 latin-1 caption"  # not UTF-8


def make_msrvtt(root: str) -> str:
  """MSR-VTT tree (CLIP4Clip layout: msrvtt_data/ + MSRVTT_Videos/).

  train (MSRVTT_train.9k.csv): video0 (3 s; captions "a dog runs", <non-UTF-8>, "a dog plays"),
    video1 (5 s; "a man cooks", "   ", "a man talks"), video2 (2 s, "a cat sleeps"),
    video3 (truncated file), video4 (0-byte file), video5 (listed, no file), a row with an empty
    video_id (malformed); MSRVTT_data.json also holds a sentence without video_id (malformed).
  test (MSRVTT_JSFUSION_test.csv): video6 (4 s, "a girl sings"), video7 (2 s, empty sentence).
  """
  data_dir = os.path.join(root, "msrvtt_data")
  videos = os.path.join(root, "MSRVTT_Videos")
  write_video(os.path.join(videos, "video0.mp4"), 3)
  write_video(os.path.join(videos, "video1.mp4"), 5)
  write_video(os.path.join(videos, "video2.mp4"), 2)
  write_truncated_video(os.path.join(videos, "video3.mp4"))
  write_empty_file(os.path.join(videos, "video4.mp4"))
  write_video(os.path.join(videos, "video6.mp4"), 4)
  write_video(os.path.join(videos, "video7.mp4"), 2)
  sentences = [
      {"caption": "a dog runs", "video_id": "video0", "sen_id": 0},
      {"caption": "@@BAD@@", "video_id": "video0", "sen_id": 1},
      {"caption": "a dog plays", "video_id": "video0", "sen_id": 2},
      {"caption": "a man cooks", "video_id": "video1", "sen_id": 3},
      {"caption": "   ", "video_id": "video1", "sen_id": 4},
      {"caption": "a man talks", "video_id": "video1", "sen_id": 5},
      {"caption": "a cat sleeps", "video_id": "video2", "sen_id": 6},
      {"caption": "broken", "video_id": "video3", "sen_id": 7},
      {"caption": "empty file", "video_id": "video4", "sen_id": 8},
      {"caption": "no file", "video_id": "video5", "sen_id": 9},
      {"caption": "no video id", "sen_id": 10},
      {"caption": "a girl sings", "video_id": "video6", "sen_id": 11},
  ]
  videos_meta = [{"video_id": f"video{i}", "url": f"https://www.youtube.com/watch?v=x{i}",
                  "split": "train", "id": i, "category": 0, "start time": 0.0, "end time": 5.0}
                 for i in range(8)]
  write_json_bytes(os.path.join(data_dir, "MSRVTT_data.json"),
                   {"info": {}, "videos": videos_meta, "sentences": sentences},
                   replace={"@@BAD@@": BAD_BYTES})
  with open(os.path.join(data_dir, "MSRVTT_train.9k.csv"), "w") as f:
    f.write("video_id\n" + "".join(f"video{i}\n" for i in range(6)) + "  \n")
  with open(os.path.join(data_dir, "MSRVTT_JSFUSION_test.csv"), "w") as f:
    f.write("key,vid_key,video_id,sentence\n"
            "ret0,msr6,video6,a girl sings\n"
            "ret1,msr7,video7,\n")
  return root


def make_msvd(root: str, captions_pickle: bytes | None = None) -> str:
  """MSVD tree: raw-captions.pkl, {train,val,test}_list.txt, YouTubeClips/<id>.avi.

  train: clipA (3 s; "a man plays guitar", ["a", "man", "sings"]), clipB (2 s; tokens with a
    non-UTF-8 byte string, ["someone", "dances"]), clipC (0-byte .avi).
  val: clipD (2 s; ["a", "cat"]).
  test: clipE (4 s; ["a", "car", "drives"], ["a", "red", "car"]), clipF (listed, no file),
    clipG (id absent from the pickle: malformed).
  `captions_pickle` replaces raw-captions.pkl (a hostile pickle, in a test).
  """
  clips = os.path.join(root, "YouTubeClips")
  write_video(os.path.join(clips, "clipA.avi"), 3)
  write_video(os.path.join(clips, "clipB.avi"), 2)
  write_empty_file(os.path.join(clips, "clipC.avi"))
  write_video(os.path.join(clips, "clipD.avi"), 2)
  write_video(os.path.join(clips, "clipE.avi"), 4)
  captions = {
      "clipA": [["a", "man", "plays", "guitar"], ["a", "man", "sings"]],
      "clipB": [[b"caf\xe9", b"dance"], ["someone", "dances"]],
      "clipC": [["nothing"]],
      "clipD": [["a", "cat"]],
      "clipE": [["a", "car", "drives"], ["a", "red", "car"]],
      "clipF": [["missing", "clip"]],
  }
  with open(os.path.join(root, "raw-captions.pkl"), "wb") as f:
    f.write(captions_pickle if captions_pickle is not None else pickle.dumps(captions))
  for split, ids in (("train", "clipA clipB clipC"), ("val", "clipD"),
                     ("test", "clipE clipF clipG")):
    with open(os.path.join(root, f"{split}_list.txt"), "w") as f:
      f.write("\n".join(ids.split()) + "\n")
  return root


def _didemo_entry(video: str, description, times) -> dict:
  return {"annotation_id": hash((video, str(description))) % 10000, "description": description,
          "video": video, "times": times, "download_link": "", "num_segments": 6}


def make_didemo(root: str) -> str:
  """DiDeMo tree: {train,val,test}_data.json + videos named as the `video` field.

  train: v1.mov (stored as `v1.mov`, 6 s): "the dog jumps" times [[1,1],[1,2]] -> 5-12.5 s,
    "a dog appears" [[0,0]] -> 0-5 s (so time order puts it first), "" (empty: skipped);
    v2.mp4 (stored as `v2.mp4.mp4`, a transcoded copy, 3 s): "a ball" [[0,1]];
    v3.mov (listed, no file); an entry without `times` and one with times "oops" (malformed).
  val: v4.avi (stored as `v4.avi`, 2 s): "a bird" [[2,3],[2,3],[3,3]] -> 11.67-20 s.
  test: v5.mp4 (0-byte file): "nothing"; v6.mp4 (2 s): "a horse" [[0,0]].
  """
  videos = os.path.join(root, "videos")
  write_video(os.path.join(videos, "v1.mov"), 6)
  write_video(os.path.join(videos, "v2.mp4.mp4"), 3)
  write_video(os.path.join(videos, "v4.avi"), 2)
  write_empty_file(os.path.join(videos, "v5.mp4"))
  write_video(os.path.join(videos, "v6.mp4"), 2)
  train = [
      _didemo_entry("v1.mov", "the dog jumps", [[1, 1], [1, 2]]),
      _didemo_entry("v1.mov", "a dog appears", [[0, 0]]),
      _didemo_entry("v1.mov", "", [[2, 2]]),
      _didemo_entry("v2.mp4", "a ball", [[0, 1]]),
      _didemo_entry("v3.mov", "no file", [[0, 0]]),
      {"description": "no times", "video": "v2.mp4"},
      _didemo_entry("v2.mp4", "bad times", "oops"),
  ]
  write_json_bytes(os.path.join(root, "train_data.json"), train)
  write_json_bytes(os.path.join(root, "val_data.json"),
                   [_didemo_entry("v4.avi", "a bird", [[2, 3], [2, 3], [3, 3]])])
  write_json_bytes(os.path.join(root, "test_data.json"),
                   [_didemo_entry("v5.mp4", "nothing", [[0, 0]]),
                    _didemo_entry("v6.mp4", "a horse", [[0, 0]])])
  return root


def make_activitynet(root: str) -> str:
  """ActivityNet Captions tree: train.json, val_1.json, train_ids.json, val_ids.json, videos.

  train: v_aaa (`v_aaa.mp4`, 5 s; sentences at [2.0, 4.0] " then he sits.", [0.0, 2.5]
    "A man walks." - stored out of time order), v_bbb (stored as `bbb.mp4`, CLIP4Clip's id
    without "v_", 3 s; one sentence), v_ccc (listed, no file), v_ddd (timestamps and sentences
    of different lengths: malformed), v_aaa listed twice in train_ids.json (duplicate).
  val: v_eee (`v_eee.avi`, 4 s; two sentences, one not UTF-8), v_fff (truncated file).
  """
  videos = os.path.join(root, "videos")
  write_video(os.path.join(videos, "v_aaa.mp4"), 5)
  write_video(os.path.join(videos, "bbb.mp4"), 3)
  write_video(os.path.join(videos, "v_ddd.mp4"), 2)
  write_video(os.path.join(videos, "v_eee.avi"), 4)
  write_truncated_video(os.path.join(videos, "v_fff.mp4"))
  train = {
      "v_aaa": {"duration": 5.0, "timestamps": [[2.0, 4.0], [0.0, 2.5]],
                "sentences": [" then he sits.", "A man walks."]},
      "v_bbb": {"duration": 3.0, "timestamps": [[0.5, 2.5]], "sentences": ["A ball rolls."]},
      "v_ccc": {"duration": 9.0, "timestamps": [[0, 1]], "sentences": ["Missing."]},
      "v_ddd": {"duration": 2.0, "timestamps": [[0, 1], [1, 2]], "sentences": ["Only one."]},
  }
  val = {
      "v_eee": {"duration": 4.0, "timestamps": [[0.0, 2.0], [2.0, 4.0]],
                "sentences": ["A bird sings.", "@@BAD@@"]},
      "v_fff": {"duration": 4.0, "timestamps": [[0.0, 4.0]], "sentences": ["Cut off."]},
  }
  write_json_bytes(os.path.join(root, "train.json"), train)
  write_json_bytes(os.path.join(root, "val_1.json"), val, replace={"@@BAD@@": BAD_BYTES})
  write_json_bytes(os.path.join(root, "train_ids.json"),
                   ["v_aaa", "v_bbb", "v_ccc", "v_ddd", "v_aaa"])
  write_json_bytes(os.path.join(root, "val_ids.json"), ["v_eee", "v_fff"])
  return root
