"""Index building: planted-feature encoder on rendered videos, incremental updates, skipped files,
model identity, atomic writes, the CLI with a real tiny model."""

import json
import os
import shutil

import numpy as np
import pytest

from search_fixtures import (CLIPS, NAMES, ColourModel, make_video_folder,
                             save_tiny_training_checkpoint, write_clip)
from tvr_jax.video_search import index as index_lib


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("videos"))
  make_video_folder(d)
  os.makedirs(os.path.join(d, "sub"))
  write_clip(os.path.join(d, "sub", "purple_cross.mp4"), "cross", "purple", "pink", "right")
  with open(os.path.join(d, "notes.txt"), "w") as f:   # not a video: ignored
    f.write("hello")
  return d


def test_build_index_contents(videos, tmp_path):
  model = ColourModel()
  out = str(tmp_path / "index")
  summary = index_lib.build_index(model, videos, out, batch_size=2, progress=False)
  assert summary.total == 5 and summary.added == 5 and summary.encoded == 5
  assert summary.skipped == [] and summary.removed == 0
  assert model.video_calls == 3   # batches of 2, 2, 1
  idx = index_lib.SearchIndex.load(out)
  rel = sorted([c[0] for c in CLIPS] + [os.path.join("sub", "purple_cross.mp4")])
  assert [v.relpath for v in idx.videos] == rel
  assert idx.tokens.shape == (5, 4, len(NAMES)) and idx.mask.shape == (5, 4)
  # 3 s clips at 1 fps: 3 real frames, 1 padding frame.
  np.testing.assert_array_equal(idx.mask, [[1, 1, 1, 0]] * 5)
  for v in idx.videos:
    assert abs(v.duration - 3.0) < 0.3, v
    assert v.id == index_lib.video_id(v.relpath) and len(v.id) == 16
    assert v.sha256 == index_lib.file_sha256(v.path)
    with open(idx.thumbnail_path(v.id), "rb") as f:
      assert f.read(3) == b"\xff\xd8\xff"   # a JPEG
  # Pooled = normalised masked mean of the tokens (brute force).
  for i in range(5):
    m = idx.tokens[i][idx.mask[i] == 1].mean(0)
    np.testing.assert_allclose(idx.pooled[i], m / np.linalg.norm(m), rtol=1e-5, atol=1e-6)
  # Planted features: the red clip's frames are mostly gray with red pixels.
  red = idx.videos[[v.relpath for v in idx.videos].index("red_circle.mp4")]
  feats = idx.tokens[idx.by_id[red.id]]
  assert feats[0, NAMES.index("gray")] > feats[0, NAMES.index("red")] > 0.05
  assert feats[0, NAMES.index("green")] < 0.01
  meta = json.load(open(os.path.join(idx.version_dir, "index.json")))
  assert meta["format_version"] == index_lib.FORMAT_VERSION
  assert meta["model"]["id"] == "planted-colour-v1"
  assert meta["frame_options"]["num_frames"] == 4


def test_incremental_update_reencodes_only_changes(tmp_path):
  d = str(tmp_path / "videos")
  paths = make_video_folder(d)
  out = str(tmp_path / "index")
  model = ColourModel()
  index_lib.build_index(model, d, out, progress=False)
  assert model.videos_encoded == 4
  before = index_lib.SearchIndex.load(out, mmap=False)
  # Change one (other content under the same name), delete one, add one, touch one (same bytes,
  # new mtime), leave one alone.
  write_clip(paths[0], "circle", "white", "black", "right")          # red_circle.mp4 now white
  os.remove(paths[1])                                                # green_square.mp4 deleted
  write_clip(os.path.join(d, "orange_square.mp4"), "square", "orange", "gray", "up")
  st = os.stat(paths[2])
  os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))    # touched only
  model2 = ColourModel()
  summary = index_lib.build_index(model2, d, out, progress=False)
  assert model2.videos_encoded == 2, "only the changed and the new video are encoded"
  assert (summary.added, summary.updated, summary.removed, summary.reused) == (1, 1, 1, 2)
  after = index_lib.SearchIndex.load(out)
  rels = [v.relpath for v in after.videos]
  assert rels == ["blue_triangle.mp4", "orange_square.mp4", "red_circle.mp4", "yellow_diamond.mp4"]
  # Unchanged / touched rows keep their features; the changed one is re-encoded.
  for rel in ("blue_triangle.mp4", "yellow_diamond.mp4"):
    i, j = after.by_id[index_lib.video_id(rel)], before.by_id[index_lib.video_id(rel)]
    np.testing.assert_array_equal(after.tokens[i], before.tokens[j])
  touched = after.videos[after.by_id[index_lib.video_id("blue_triangle.mp4")]]
  assert touched.mtime_ns == os.stat(paths[2]).st_mtime_ns
  changed = after.tokens[after.by_id[index_lib.video_id("red_circle.mp4")]]
  assert changed[0, NAMES.index("white")] > 0.05 and changed[0, NAMES.index("red")] < 0.01
  # Only one version directory remains.
  assert sorted(n for n in os.listdir(out) if n.startswith("v-")) == [
      os.path.basename(after.version_dir)]
  # A third run with nothing changed encodes nothing.
  model3 = ColourModel()
  summary = index_lib.build_index(model3, d, out, progress=False)
  assert model3.videos_encoded == 0 and summary.reused == 4


def test_unreadable_videos_are_skipped_and_listed(tmp_path, capsys):
  d = str(tmp_path / "videos")
  make_video_folder(d, CLIPS[:2])
  with open(os.path.join(d, "broken.mp4"), "wb") as f:
    f.write(b"this is not a video" * 50)
  open(os.path.join(d, "empty.mov"), "wb").close()
  out = str(tmp_path / "index")
  summary = index_lib.build_index(ColourModel(), d, out, progress=False)
  assert summary.total == 2
  kinds = {os.path.basename(s["path"]): s["kind"] for s in summary.skipped}
  assert kinds == {"broken.mp4": "undecodable", "empty.mov": "empty"}
  text = summary.format()
  assert "skipped 2 unreadable" in text and "broken.mp4" in text and "empty.mov" in text
  idx = index_lib.SearchIndex.load(out)
  assert {os.path.basename(s["path"]) for s in idx.skipped} == {"broken.mp4", "empty.mov"}
  assert [v.relpath for v in idx.videos] == ["green_square.mp4", "red_circle.mp4"]


def test_other_model_refused(tmp_path):
  d = str(tmp_path / "videos")
  make_video_folder(d, CLIPS[:1])
  out = str(tmp_path / "index")
  index_lib.build_index(ColourModel(), d, out, progress=False)
  other = ColourModel(model_id="planted-colour-v2")
  with pytest.raises(index_lib.ModelMismatchError, match="built with model planted-colour-v1"):
    index_lib.build_index(other, d, out, progress=False)
  with pytest.raises(index_lib.ModelMismatchError, match="rebuild"):
    index_lib.SearchIndex.load(out).check_model(other.model_id)
  summary = index_lib.build_index(other, d, out, progress=False, rebuild=True)
  assert summary.encoded == 1
  assert index_lib.SearchIndex.load(out).model_id == "planted-colour-v2"


def test_failed_write_leaves_previous_index(tmp_path, monkeypatch):
  d = str(tmp_path / "videos")
  make_video_folder(d, CLIPS[:2])
  out = str(tmp_path / "index")
  index_lib.build_index(ColourModel(), d, out, progress=False)
  good = index_lib.SearchIndex.load(out, mmap=False)
  write_clip(os.path.join(d, "third.mp4"), "cross", "purple", "pink")
  real_save = np.save

  def failing_save(path, arr, *a, **k):
    if str(path).endswith("pooled.npy"):
      raise OSError("disk full (simulated)")
    return real_save(path, arr, *a, **k)

  monkeypatch.setattr(index_lib.np, "save", failing_save)
  with pytest.raises(OSError, match="disk full"):
    index_lib.build_index(ColourModel(), d, out, progress=False)
  monkeypatch.undo()
  again = index_lib.SearchIndex.load(out, mmap=False)
  assert [v.id for v in again.videos] == [v.id for v in good.videos]
  np.testing.assert_array_equal(again.tokens, good.tokens)
  assert sorted(os.listdir(out)) == ["CURRENT", os.path.basename(good.version_dir)]


def test_missing_or_corrupt_index_is_a_clear_error(tmp_path):
  with pytest.raises(index_lib.IndexFormatError, match="holds no index"):
    index_lib.SearchIndex.load(str(tmp_path))
  (tmp_path / "CURRENT").write_text("../../etc\n")
  with pytest.raises(index_lib.IndexFormatError, match="corrupt"):
    index_lib.SearchIndex.load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    index_lib.build_index(ColourModel(), str(tmp_path / "nope"), str(tmp_path / "i"),
                          progress=False)


def test_cli_with_real_tiny_model(tmp_path, capsys):
  """python -m tvr_jax.index with a tiny randomly initialised model in the training layout."""
  from tvr_jax import index as index_cli
  ckpt = save_tiny_training_checkpoint(str(tmp_path / "run"))
  d = str(tmp_path / "videos")
  make_video_folder(d, CLIPS[:3])
  with open(os.path.join(d, "broken.mp4"), "wb") as f:
    f.write(b"\x00" * 100)
  out = str(tmp_path / "index")
  rc = index_cli.main(["--checkpoint", ckpt, "--videos", d, "--out", out, "--workers", "2",
                       "--no_progress"])
  printed = capsys.readouterr().out
  assert rc == 0, printed
  assert "3 videos (3 added" in printed and "broken.mp4" in printed
  idx = index_lib.SearchIndex.load(out)
  assert idx.tokens.shape == (3, 8, 32)   # synthetic config: 8 frames, tiny CLIP D=32
  assert idx.meta["checkpoint"] == os.path.abspath(ckpt)
  assert idx.model_id.startswith("sha256:")
  # Re-run: nothing re-encoded; another model (other seed) is refused with a clear message.
  rc = index_cli.main(["--checkpoint", ckpt, "--videos", d, "--out", out, "--no_progress"])
  assert rc == 0 and "3 unchanged" in capsys.readouterr().out
  other = save_tiny_training_checkpoint(str(tmp_path / "run2"), seed=1)
  rc = index_cli.main(["--checkpoint", other, "--videos", d, "--out", out, "--no_progress"])
  err = capsys.readouterr().err
  assert rc == 1 and "was built with model" in err
  shutil.rmtree(str(tmp_path / "run2"))
