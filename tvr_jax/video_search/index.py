"""Building and incrementally updating a search index over a folder of videos.

Layout of an index directory (format version `FORMAT_VERSION`):

    INDEX/CURRENT                 one line: the name of the live version directory
    INDEX/v-<hex>/index.json      format version, model id, frame options, videos, skipped files
    INDEX/v-<hex>/tokens.npy      float32 [N, F, D] visual tokens (the model's encode_video output)
    INDEX/v-<hex>/mask.npy        int32 [N, F], 1 = real frame
    INDEX/v-<hex>/pooled.npy      float32 [N, D], L2-normalised masked mean of the tokens
    INDEX/v-<hex>/thumbs/<id>.jpg small JPEG of the middle real frame

A build writes a whole new version directory and then replaces `CURRENT` (an atomic rename of one
small file), so a reader sees the old index or the new one, never a half-written one; older version
directories are removed afterwards. Videos are identified by `id` = first 16 hex digits of the
sha256 of their path relative to the video folder; only ids of indexed files are ever served.

Incremental updates: a file whose size and mtime are unchanged is reused as is; when either changed
its content sha256 is compared with the stored one (a touched but identical file is reused too);
otherwise it is re-encoded. Files that disappeared are dropped. Unreadable videos are skipped and
listed (`skipped` in index.json and in the summary).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from typing import Any, Iterable, Optional

import numpy as np
from PIL import Image

from data_prep import frames as frames_lib

FORMAT_VERSION = 1
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv",
                    ".flv", ".3gp", ".ts", ".ogv")
THUMBNAIL_SIZE = 160
_POINTER = "CURRENT"


class IndexFormatError(RuntimeError):
  """An index directory that cannot be used (missing, corrupt, wrong format)."""


class ModelMismatchError(IndexFormatError):
  """The index was built with another model than the one given."""


@dataclasses.dataclass
class IndexedVideo:
  """One indexed video (a row of the feature arrays, in the same order)."""
  id: str
  path: str          # absolute path of the file
  relpath: str       # path relative to the indexed folder
  size: int
  mtime_ns: int
  sha256: str
  duration: float
  num_frames: int    # real (unpadded) frames


@dataclasses.dataclass
class BuildSummary:
  """What a build did; `encoded` counts videos passed to the encoder."""
  index_dir: str
  total: int
  added: int
  updated: int
  reused: int
  removed: int
  encoded: int
  skipped: list[dict]
  seconds: float

  def format(self) -> str:
    """Human-readable summary, skipped files listed one per line."""
    lines = [f"index {self.index_dir}: {self.total} videos ({self.added} added, {self.updated} "
             f"re-encoded, {self.reused} unchanged, {self.removed} removed) in {self.seconds:.1f} s"
             f"; {self.encoded / max(self.seconds, 1e-9):.2f} videos/s encoded"]
    if self.skipped:
      lines.append(f"skipped {len(self.skipped)} unreadable video(s):")
      lines += [f"  {s['path']}: {s['kind']} ({s['detail']})" for s in self.skipped]
    return "\n".join(lines)


def video_id(relpath: str) -> str:
  """Stable id of a video from its path relative to the indexed folder (16 hex digits)."""
  return hashlib.sha256(relpath.replace(os.sep, "/").encode()).hexdigest()[:16]


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
  """Hex sha256 of a file's content, read in 1 MiB chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      h.update(block)
  return h.hexdigest()


def scan_videos(videos_dir: str) -> list[tuple[str, str]]:
  """Sorted (relative, absolute path) of video files under `videos_dir` (hidden ones skipped)."""
  videos_dir = os.path.abspath(videos_dir)
  if not os.path.isdir(videos_dir):
    raise FileNotFoundError(f"video folder {videos_dir} does not exist")
  out = []
  for root, dirs, files in os.walk(videos_dir):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in files:
      if name.startswith(".") or not name.lower().endswith(VIDEO_EXTENSIONS):
        continue
      full = os.path.join(root, name)
      if os.path.isfile(full):
        out.append((os.path.relpath(full, videos_dir), full))
  return sorted(out)


def pool_tokens(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """L2-normalised masked mean of visual tokens: [N, F, D], [N, F] -> float32 [N, D]."""
  m = mask.astype(np.float32)[..., None]
  mean = (tokens.astype(np.float32) * m).sum(1) / np.maximum(m.sum(1), 1.0)
  return (mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-6)).astype(np.float32)


def decode_frames(extracted: frames_lib.ExtractedFrames) -> np.ndarray:
  """JPEG frames of `extract_frames` -> uint8 [F, R, R, 3] (decoded as in the training pipeline)."""
  return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in extracted.frames])


def make_thumbnail(extracted: frames_lib.ExtractedFrames, size: int = THUMBNAIL_SIZE) -> bytes:
  """JPEG bytes of the middle real frame, at most `size` px a side."""
  real = int(extracted.mask.sum())
  image = Image.open(io.BytesIO(extracted.frames[max(real, 1) // 2 if real else 0])).convert("RGB")
  image.thumbnail((size, size))
  buf = io.BytesIO()
  image.save(buf, format="JPEG", quality=85)
  return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# Reading.
# ------------------------------------------------------------------------------------------------
def current_version_dir(index_dir: str) -> Optional[str]:
  """The live version directory of an index, or None when `index_dir` holds no index."""
  pointer = os.path.join(index_dir, _POINTER)
  if not os.path.isfile(pointer):
    return None
  with open(pointer) as f:
    name = f.read().strip()
  path = os.path.join(index_dir, name)
  if not name.startswith("v-") or os.sep in name or not os.path.isdir(path):
    raise IndexFormatError(f"index {index_dir} is corrupt: {_POINTER} names {name!r}, not a "
                           "version directory")
  return path


def version_stamp(index_dir: str) -> Optional[tuple[int, int, int]]:
  """Cheap fingerprint of the live version: (inode, mtime_ns, size) of `CURRENT`, one stat.

  Every build commits by renaming a new file over `CURRENT`, so the inode (and mtime) changes
  with each new version; a server compares stamps per request to notice a rebuild. None when
  `index_dir` holds no index.
  """
  try:
    st = os.stat(os.path.join(index_dir, _POINTER))
  except FileNotFoundError:
    return None
  return st.st_ino, st.st_mtime_ns, st.st_size


class SearchIndex:
  """A loaded index: metadata, videos and (memory-mapped) feature arrays."""

  def __init__(self, directory: str, meta: dict, videos: list[IndexedVideo], tokens: np.ndarray,
               mask: np.ndarray, pooled: np.ndarray, version_dir: str):
    self.directory = directory
    self.meta = meta
    self.videos = videos
    self.tokens = tokens
    self.mask = mask
    self.pooled = pooled
    self.version_dir = version_dir
    self.by_id = {v.id: i for i, v in enumerate(videos)}

  @property
  def model_id(self) -> str:
    return self.meta["model"]["id"]

  @property
  def skipped(self) -> list[dict]:
    return list(self.meta.get("skipped", []))

  def __len__(self) -> int:
    return len(self.videos)

  def thumbnail_path(self, vid: str) -> Optional[str]:
    """Path of an indexed video's thumbnail (None for an unknown id)."""
    if vid not in self.by_id:
      return None
    return os.path.join(self.version_dir, "thumbs", f"{vid}.jpg")

  def check_model(self, model_id: str, description: str = "") -> None:
    """Raises ModelMismatchError unless the index was built with `model_id`."""
    if model_id != self.model_id:
      raise ModelMismatchError(
          f"index {self.directory} was built with model {self.model_id[:19]}… "
          f"({self.meta['model'].get('description', '')}); the model given is {model_id[:19]}… "
          f"({description}). Query with the model that built the index, or rebuild it: "
          f"python -m tvr_jax.index --checkpoint CKPT --videos DIR --out NEW_INDEX")

  @classmethod
  def load(cls, index_dir: str, mmap: bool = True) -> "SearchIndex":
    """Opens an index directory (features memory-mapped unless `mmap=False`)."""
    index_dir = os.path.abspath(index_dir)
    version = current_version_dir(index_dir)
    if version is None:
      raise IndexFormatError(f"{index_dir} holds no index (no {_POINTER} file); build one with "
                             "python -m tvr_jax.index --checkpoint CKPT --videos DIR --out "
                             f"{index_dir}")
    try:
      with open(os.path.join(version, "index.json")) as f:
        meta = json.load(f)
    except (OSError, ValueError) as e:
      raise IndexFormatError(f"index {index_dir}: cannot read index.json ({e})") from e
    if meta.get("format_version") != FORMAT_VERSION:
      raise IndexFormatError(f"index {index_dir} has format version {meta.get('format_version')}, "
                             f"this code reads version {FORMAT_VERSION}; rebuild it with python -m "
                             "tvr_jax.index")
    videos = [IndexedVideo(**v) for v in meta["videos"]]
    mode = "r" if mmap else None
    arrays = {}
    for name in ("tokens", "mask", "pooled"):
      try:
        arrays[name] = np.load(os.path.join(version, f"{name}.npy"), mmap_mode=mode)
      except (OSError, ValueError) as e:
        raise IndexFormatError(f"index {index_dir}: cannot read {name}.npy ({e})") from e
      if arrays[name].shape[0] != len(videos):
        raise IndexFormatError(f"index {index_dir}: {name}.npy has {arrays[name].shape[0]} rows "
                               f"for {len(videos)} videos")
    return cls(index_dir, meta, videos, arrays["tokens"], arrays["mask"], arrays["pooled"],
               version)


# ------------------------------------------------------------------------------------------------
# Writing.
# ------------------------------------------------------------------------------------------------
def write_index(index_dir: str, *, model_meta: dict, videos: list[IndexedVideo],
                tokens: np.ndarray, mask: np.ndarray, thumbnails: dict[str, Any],
                skipped: Iterable[dict] = (), extra: Optional[dict] = None) -> str:
  """Writes a complete new version of the index and switches `CURRENT` to it atomically.

  Args:
    index_dir: the index directory (created if needed).
    model_meta: {"id": model id, "description": ..., "frame_options": {...}, ...}.
    videos: one IndexedVideo per row.
    tokens: float32 [N, F, D]; mask: int [N, F].
    thumbnails: id -> JPEG bytes, or id -> path of an existing JPEG to copy.
    skipped: dicts {path, kind, detail} of unreadable videos.
    extra: more JSON fields (e.g. the videos folder).

  Returns:
    The new version directory.
  """
  index_dir = os.path.abspath(index_dir)
  os.makedirs(index_dir, exist_ok=True)
  tokens = np.asarray(tokens, np.float32)
  mask = np.asarray(mask, np.int32)
  n = len(videos)
  if tokens.shape[0] != n or mask.shape != tokens.shape[:2]:
    raise ValueError(f"write_index: {n} videos but tokens {tokens.shape}, mask {mask.shape}")
  name = f"v-{uuid.uuid4().hex[:12]}"
  tmp = os.path.join(index_dir, f".tmp-{name}")
  final = os.path.join(index_dir, name)
  try:
    os.makedirs(os.path.join(tmp, "thumbs"))
    np.save(os.path.join(tmp, "tokens.npy"), tokens)
    np.save(os.path.join(tmp, "mask.npy"), mask)
    np.save(os.path.join(tmp, "pooled.npy"), pool_tokens(tokens, mask) if n else
            np.zeros((0, tokens.shape[-1] if tokens.ndim == 3 else 0), np.float32))
    for v in videos:
      thumb = thumbnails[v.id]
      dst = os.path.join(tmp, "thumbs", f"{v.id}.jpg")
      if isinstance(thumb, (bytes, bytearray)):
        with open(dst, "wb") as f:
          f.write(thumb)
      else:
        shutil.copyfile(thumb, dst)
    meta = {"format_version": FORMAT_VERSION, "model": model_meta,
            "num_videos": n, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}), "skipped": list(skipped),
            "videos": [dataclasses.asdict(v) for v in videos]}
    with open(os.path.join(tmp, "index.json"), "w") as f:
      json.dump(meta, f, indent=1)
    os.rename(tmp, final)
    pointer_tmp = os.path.join(index_dir, f".{_POINTER}.{name}")
    with open(pointer_tmp, "w") as f:
      f.write(name + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(pointer_tmp, os.path.join(index_dir, _POINTER))   # the commit
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if current_version_dir(index_dir) != final:
      shutil.rmtree(final, ignore_errors=True)
    raise
  for other in os.listdir(index_dir):   # old versions and leftovers of interrupted builds
    if other != name and (other.startswith("v-") or other.startswith(".tmp-v-")
                          or other.startswith(f".{_POINTER}.")):
      target = os.path.join(index_dir, other)
      if os.path.isdir(target):
        shutil.rmtree(target, ignore_errors=True)
      else:
        os.remove(target)
  return final


def model_meta_of(model) -> dict:
  """The `model` entry of index.json for a SearchModel."""
  return {"id": model.model_id, "description": getattr(model, "description", ""),
          "frame_options": dataclasses.asdict(model.frame_options)}


def build_index(model, videos_dir: str, index_dir: str, *, workers: int = 1,
                batch_size: int = 16, progress: bool = True, rebuild: bool = False,
                checkpoint: Optional[str] = None) -> BuildSummary:
  """Indexes every video under `videos_dir` into `index_dir`, reusing what is unchanged.

  Args:
    model: a SearchModel (see `tvr_jax.video_search.model`).
    videos_dir: folder scanned recursively for video files (`VIDEO_EXTENSIONS`).
    index_dir: the index directory; an existing index is updated incrementally.
    workers: frame-extraction processes.
    batch_size: videos per `model.encode_videos` call.
    progress: tqdm progress bar.
    rebuild: ignore an existing index (also one built with another model) and encode everything.
    checkpoint: the checkpoint path, recorded so `tvr_jax.search` can load the same model.

  Raises:
    ModelMismatchError: the existing index was built with another model (and not `rebuild`).
  """
  start = time.time()
  videos_dir = os.path.abspath(videos_dir)
  index_dir = os.path.abspath(index_dir)
  files = scan_videos(videos_dir)
  old: Optional[SearchIndex] = None
  if not rebuild and current_version_dir(index_dir) is not None:
    old = SearchIndex.load(index_dir)
    old.check_model(model.model_id, getattr(model, "description", ""))
    if old.meta.get("frame_options") not in (None, dataclasses.asdict(model.frame_options)):
      old = None
  old_rows = {v.relpath: i for i, v in enumerate(old.videos)} if old else {}
  keep: dict[str, tuple[int, IndexedVideo]] = {}   # relpath -> (old row, updated record)
  to_encode: list[tuple[str, str, int, int, str]] = []
  for rel, full in files:
    st = os.stat(full)
    row = old_rows.get(rel)
    if row is not None:
      prev = old.videos[row]
      if prev.size == st.st_size and prev.mtime_ns == st.st_mtime_ns:
        keep[rel] = (row, dataclasses.replace(prev, path=full))
        continue
      digest = file_sha256(full)
      if digest == prev.sha256:
        keep[rel] = (row, dataclasses.replace(prev, path=full, size=st.st_size,
                                              mtime_ns=st.st_mtime_ns))
        continue
    else:
      digest = file_sha256(full)
    to_encode.append((rel, full, st.st_size, st.st_mtime_ns, digest))

  options = model.frame_options
  new_records: dict[str, IndexedVideo] = {}
  new_tokens: dict[str, np.ndarray] = {}
  new_masks: dict[str, np.ndarray] = {}
  thumbs: dict[str, Any] = {}
  skipped: list[dict] = []
  info = {rel: (full, size, mtime, digest) for rel, full, size, mtime, digest in to_encode}
  pending: list[tuple[str, np.ndarray, np.ndarray]] = []
  encoded = 0

  def flush():
    nonlocal encoded
    if not pending:
      return
    frames = np.stack([p[1] for p in pending])
    masks = np.stack([p[2] for p in pending]).astype(np.int32)
    tokens = np.asarray(model.encode_videos(frames, masks), np.float32)
    for (rel, _, m), t in zip(pending, tokens):
      new_tokens[rel], new_masks[rel] = t, m
    encoded += len(pending)
    pending.clear()

  jobs = [(rel, full, None) for rel, full, *_ in to_encode]
  for rel, result in frames_lib.extract_many(jobs, options, workers=workers, total=len(jobs),
                                             desc="indexing videos", progress=progress):
    full, size, mtime, digest = info[rel]
    if isinstance(result, frames_lib.VideoError):
      skipped.append({"path": full, "kind": result.kind, "detail": result.detail})
      continue
    vid = video_id(rel)
    new_records[rel] = IndexedVideo(id=vid, path=full, relpath=rel, size=size, mtime_ns=mtime,
                                    sha256=digest, duration=float(result.duration),
                                    num_frames=int(result.mask.sum()))
    thumbs[vid] = make_thumbnail(result)
    pending.append((rel, decode_frames(result), result.mask))
    if len(pending) >= batch_size:
      flush()
  flush()

  videos, token_rows, mask_rows = [], [], []
  for rel, _ in files:
    if rel in keep:
      row, rec = keep[rel]
      videos.append(rec)
      token_rows.append(np.asarray(old.tokens[row]))
      mask_rows.append(np.asarray(old.mask[row]))
      thumbs[rec.id] = old.thumbnail_path(rec.id)
    elif rel in new_records:
      videos.append(new_records[rel])
      token_rows.append(new_tokens[rel])
      mask_rows.append(new_masks[rel])
  if videos:
    tokens, masks = np.stack(token_rows), np.stack(mask_rows)
  else:
    dim = old.tokens.shape[-1] if old is not None else 0
    tokens = np.zeros((0, options.num_frames, dim), np.float32)
    masks = np.zeros((0, options.num_frames), np.int32)
  skipped.sort(key=lambda s: s["path"])
  extra = {"videos_dir": videos_dir, "checkpoint": checkpoint,
           "frame_options": dataclasses.asdict(options)}
  write_index(index_dir, model_meta=model_meta_of(model), videos=videos, tokens=tokens,
              mask=masks, thumbnails=thumbs, skipped=skipped, extra=extra)
  present = {rel for rel, _ in files}
  updated = sum(1 for rel in new_records if rel in old_rows)
  return BuildSummary(
      index_dir=index_dir, total=len(videos), added=len(new_records) - updated, updated=updated,
      reused=len(keep), removed=sum(1 for rel in old_rows if rel not in present),
      encoded=encoded, skipped=skipped, seconds=time.time() - start)
