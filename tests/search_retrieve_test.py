"""Two-stage retrieval: chunked exact top-k vs brute force, re-scoring vs brute-force DMAE /
max-mean loops, text and video queries on rendered videos (planted encoder), end to end with a
real tiny model (CLI), and refusal of another model."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from search_fixtures import CLIPS, ColourModel, make_video_folder, save_tiny_training_checkpoint, \
    write_clip
from tvr_jax.video_search import index as index_lib
from tvr_jax.video_search import retrieve


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_chunked_top_k_matches_brute_force():
  rng = np.random.default_rng(0)
  pooled = _unit(rng.normal(size=(50, 16)).astype(np.float32))
  q = _unit(rng.normal(size=(3, 16)).astype(np.float32))
  for chunk in (7, 50, 1000):    # ragged last chunk, one chunk, chunk > N
    pi = retrieve.PooledIndex(pooled, chunk=chunk)
    for k in (1, 5, 20, 60):
      vals, rows = pi.top_k(q, k)
      want = np.argsort(-(q @ pooled.T), axis=1, kind="stable")[:, :min(k, 50)]
      np.testing.assert_array_equal(rows, want)
      np.testing.assert_allclose(vals, np.take_along_axis(q @ pooled.T, want, 1), rtol=1e-5,
                                 atol=1e-6)


def _max_mean(a, am, b, bm):
  """0.5 * (mean over a's real tokens of max over b's + the reverse), by loops."""
  s = [[float(np.dot(a[i], b[j])) * am[i] * bm[j] for j in range(len(b))] for i in range(len(a))]
  ra = [max(s[i]) for i in range(len(a)) if am[i]]
  rb = [max(s[i][j] for i in range(len(a))) for j in range(len(b)) if bm[j]]
  return 0.5 * (np.mean(ra) + np.mean(rb))


class _PlantedModel:
  """Features given directly: text features fixed per query string."""
  model_id = "planted-arrays"
  similarity_kwargs = dict(textual_attention=True, visual_attention=False)
  token_weights = None

  def __init__(self, texts):
    self.texts = texts

  def encode_texts(self, texts):
    return self.texts[texts[0]]


def _planted_index(tmp_path, tokens, mask):
  n = len(tokens)
  videos = [index_lib.IndexedVideo(id=f"{i:016x}", path=f"/v/{i}.mp4", relpath=f"{i}.mp4", size=1,
                                   mtime_ns=0, sha256="", duration=float(i), num_frames=4)
            for i in range(n)]
  out = str(tmp_path / "planted")
  index_lib.write_index(out, model_meta={"id": "planted-arrays"}, videos=videos, tokens=tokens,
                        mask=mask, thumbnails={v.id: b"\xff\xd8\xff" for v in videos})
  return index_lib.SearchIndex.load(out)


def test_rescoring_is_dmae_on_the_shortlist(tmp_path):
  """Stage 2 re-ranks the stage-1 shortlist by brute-force DMAE (no visual attention here)."""
  rng = np.random.default_rng(1)
  n, f, d, w = 40, 4, 8, 5
  tokens = _unit(rng.normal(size=(n, f, d))).astype(np.float32)
  mask = np.ones((n, f), np.int32)
  mask[::3, 3] = 0
  tokens[mask == 0] = 0
  sent = _unit(rng.normal(size=(1, d))).astype(np.float32)
  words = _unit(rng.normal(size=(1, w, d))).astype(np.float32)
  wmask = np.array([[1, 1, 1, 0, 0]], np.int32)
  idx = _planted_index(tmp_path, tokens, mask)
  searcher = retrieve.Searcher(idx, _PlantedModel({"q": (sent, words, wmask)}), shortlist=12,
                               chunk=16)
  res = searcher.search_text("q", top=5)
  # Stage 1 by brute force: the 12 best pooled cosines.
  pooled = _unit((tokens * mask[..., None]).sum(1) / mask.sum(1, keepdims=True))
  shortlist = np.argsort(-(pooled @ sent[0]), kind="stable")[:12]
  # Stage 2 by loops: 0.5 * (sentence branch + word branch), each a max-mean.
  def dmae(i):
    s_branch = _max_mean(sent, [1], tokens[i], mask[i])
    w_branch = _max_mean(words[0], wmask[0], tokens[i], mask[i])
    return 0.5 * (s_branch + w_branch)
  want = sorted(shortlist, key=lambda i: -dmae(i))[:5]
  assert [h.relpath for h in res.hits] == [f"{i}.mp4" for i in want]
  for h in res.hits:
    i = int(h.relpath.split(".")[0])
    assert h.score == pytest.approx(dmae(i), abs=1e-5)
    assert h.first_stage == pytest.approx(float(pooled[i] @ sent[0]), abs=1e-5)
  assert set(res.timings) == {"encode", "first_stage", "rescore"}
  # The re-ranking is not the first-stage order here (otherwise stage 2 would prove nothing).
  assert [h.relpath for h in res.hits] != [f"{i}.mp4" for i in shortlist[:5]]
  # Video -> video on the same index: symmetric max-mean, a video is its own best match.
  res = searcher.search_video(idx.videos[7].id, top=3)
  assert res.hits[0].relpath == "7.mp4" and res.hits[0].score == pytest.approx(1.0, abs=1e-5)
  for h in res.hits:
    i = int(h.relpath.split(".")[0])
    assert h.score == pytest.approx(_max_mean(tokens[7], mask[7], tokens[i], mask[i]), abs=1e-5)


@pytest.fixture(scope="module")
def colour_index(tmp_path_factory):
  root = tmp_path_factory.mktemp("colour")
  d = str(root / "videos")
  make_video_folder(d)
  write_clip(os.path.join(d, "red_square_black.mp4"), "square", "red", "black", "up")
  out = str(root / "index")
  index_lib.build_index(ColourModel(), d, out, progress=False)
  return out, root


def test_text_and_video_queries_with_planted_features(colour_index):
  out, root = colour_index
  searcher = retrieve.Searcher(index_lib.SearchIndex.load(out), ColourModel(), shortlist=3)
  res = searcher.search_text("a yellow shape", top=10)
  assert res.hits[0].relpath == "yellow_diamond.mp4"
  assert [h.rank for h in res.hits] == list(range(1, 6))
  # "red on black": the red square on black beats the red circle on gray and the green on black.
  res = searcher.search_text("red black", top=3)
  assert res.hits[0].relpath == "red_square_black.mp4"
  assert {res.hits[1].relpath, res.hits[2].relpath} == {"red_circle.mp4", "green_square.mp4"}
  # A video file that is not indexed: another red circle on gray (other start, other direction).
  query = write_clip(str(root / "query.mp4"), "circle", "red", "gray", "right", start=(0.7, 0.1))
  res = searcher.search_video(query, top=2)
  assert res.hits[0].relpath == "red_circle.mp4" and res.timings["encode"] > 0
  # An indexed id: itself first with score 1.
  vid = index_lib.video_id("blue_triangle.mp4")
  res = searcher.search_video(vid, top=1)
  assert res.hits[0].id == vid and res.hits[0].score == pytest.approx(1.0, abs=1e-5)
  with pytest.raises(FileNotFoundError, match="neither an indexed video id"):
    searcher.search_video("no_such_file.mp4")
  with pytest.raises(ValueError, match="empty"):
    searcher.search_text("  ")
  table = retrieve.format_table(searcher.search_text("blue", top=2))
  assert table.splitlines()[0].split() == ["rank", "score", "file", "duration"]
  assert "blue_triangle.mp4" in table.splitlines()[1] and "3.0s" in table.splitlines()[1]


def test_other_model_refused_at_query_time(colour_index):
  out, _ = colour_index
  with pytest.raises(index_lib.ModelMismatchError, match="planted-colour-v1"):
    retrieve.Searcher(index_lib.SearchIndex.load(out), ColourModel(model_id="other"))


def test_end_to_end_real_tiny_model(tmp_path, capsys):
  """Index with the CLI, search with the CLI: a real (random) tiny model runs and is consistent."""
  from tvr_jax import index as index_cli
  from tvr_jax import search as search_cli
  from tvr_jax.video_search import model as model_lib
  ckpt = save_tiny_training_checkpoint(str(tmp_path / "run"))
  d = str(tmp_path / "videos")
  make_video_folder(d)
  out = str(tmp_path / "index")
  assert index_cli.main(["--checkpoint", ckpt, "--videos", d, "--out", out, "--workers", "1",
                         "--no_progress"]) == 0
  capsys.readouterr()
  vid = index_lib.video_id("blue_triangle.mp4")
  assert search_cli.main(["--index", out, "--video", vid, "--top", "4"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].split() == ["rank", "score", "file", "duration"] and len(lines) == 5
  assert lines[1].split()[2] == "blue_triangle.mp4" and float(lines[1].split()[1]) > 0.9999
  # Text: the ranking equals the model's own DMAE similarity over all (4 <= shortlist) videos.
  assert search_cli.main(["--index", out, "a large red circle moves to the left",
                          "--top", "4"]) == 0
  ranked = [ln.split()[2] for ln in capsys.readouterr().out.splitlines()[1:]]
  model = model_lib.load_retrieval_model(ckpt)
  idx = index_lib.SearchIndex.load(out)
  from tvr_jax.tokenizer import tokenize
  ids = tokenize(["a large red circle moves to the left"], context_length=model.max_words)
  text = model.model.encode_text(jnp.asarray(ids))
  sims = np.asarray(model.model.similarity(text, (jnp.asarray(idx.tokens), jnp.asarray(idx.mask))))
  want = [idx.videos[i].relpath for i in np.argsort(-sims[0], kind="stable")]
  assert ranked == want
  # Errors are clear and exit 1.
  assert search_cli.main(["--index", str(tmp_path / "nothing"), "red"]) == 1
  assert "holds no index" in capsys.readouterr().err
  other = save_tiny_training_checkpoint(str(tmp_path / "run2"), seed=3)
  assert search_cli.main(["--index", out, "--checkpoint", other, "red"]) == 1
  assert "was built with model" in capsys.readouterr().err


def test_load_model_layouts(tmp_path):
  """A step directory loads the same model as its work directory; a converted CLIP directory gives
  a zero-shot model; anything else is a clear ModelLoadError."""
  from flax import nnx
  from tvr_jax import checkpointing
  from tvr_jax.models import clip as clip_lib
  from tvr_jax.video_search import model as model_lib
  run = save_tiny_training_checkpoint(str(tmp_path / "run"))
  a = model_lib.load_retrieval_model(run)
  b = model_lib.load_retrieval_model(os.path.join(run, "checkpoints", "1"))
  assert a.model_id == b.model_id and a.frame_options.num_frames == 8
  clip = clip_lib.CLIP(clip_lib.CLIPConfig.preset("tiny"), rngs=nnx.Rngs(0))
  clip_dir = tmp_path / "clip"
  clip_dir.mkdir()
  (clip_dir / clip_lib.CONFIG_FILE).write_text(json.dumps(clip.config.to_dict()))
  params = nnx.to_pure_dict(nnx.state(clip, nnx.Param))
  checkpointing.save_pytree(str(clip_dir / clip_lib.PARAMS_DIR),
                            clip_lib.unflatten_params(clip_lib.flatten_params(params)))
  zs = model_lib.load_retrieval_model(str(clip_dir))
  assert (zs.frame_options.num_frames, zs.frame_options.resolution) == (12, 32)
  assert zs.model_id != a.model_id
  d = str(tmp_path / "videos")
  make_video_folder(d, CLIPS[:2])
  out = str(tmp_path / "index")
  index_lib.build_index(zs, d, out, progress=False)
  searcher = retrieve.Searcher(index_lib.SearchIndex.load(out), zs)
  vid = index_lib.video_id("green_square.mp4")
  assert searcher.search_video(vid, 2).hits[0].id == vid
  assert len(searcher.search_text("a green square", 2).hits) == 2
  with pytest.raises(model_lib.ModelLoadError, match="neither a training work directory"):
    model_lib.load_retrieval_model(d)
  with pytest.raises(model_lib.ModelLoadError, match="does not exist"):
    model_lib.load_retrieval_model(str(tmp_path / "nothing"))
