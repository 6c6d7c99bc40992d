"""The exact CLIP byte-pair-encoding tokenizer, offline and without torch.

Reimplements OpenAI's `simple_tokenizer` as redistributed by open_clip (`open_clip.tokenize`): the
same text cleaning (`ftfy.fix_text`, `html.unescape` twice, whitespace collapsed, lower-cased), the
same word-splitting regex and the same 49,408-token vocabulary, so the ids are identical to
open_clip's. The vocabulary ships in `tvr_jax/assets/bpe_simple_vocab_16e6.txt.gz` (MIT, OpenAI);
if that copy is missing, the one inside an installed open_clip package is used (found without
importing open_clip, which would import torch).

Typical use:

  ids = tokenize(["a dog runs on the beach", "a cat"], context_length=32)  # int32 [2, 32]
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
from typing import Iterable, Sequence

import ftfy
import numpy as np
import regex

__all__ = ["CLIPTokenizer", "default_vocab_path", "get_tokenizer", "tokenize"]

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# Lines 1 .. 48,894 of the vocabulary file are the merges (line 0 is a header), so that
# 256 bytes + 256 bytes with `</w>` + 48,894 merges + 2 special tokens = 49,408 ids.
_NUM_MERGES = 49152 - 256 - 2
_SOT = "<start_of_text>"
_EOT = "<end_of_text>"
# open_clip's pattern (OpenAI's with its own special-token spelling). A caption that literally
# contains "<start_of_text>" / "<end_of_text>" gets the special id there, exactly as in open_clip.
_WORD_PATTERN = regex.compile(
    _SOT + "|" + _EOT + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)
# Printable ASCII without '&', plus tab / newline / carriage return. On such text ftfy.fix_text
# changes nothing that survives whitespace collapsing (no mojibake, entities, curly quotes, control
# or width characters; it only turns '\r' into '\n'), and html.unescape has nothing to unescape,
# so cleaning can skip both. The open_clip comparison test exercises this path.
_PLAIN_ASCII = regex.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")


def default_vocab_path() -> str:
  """Returns the path of `bpe_simple_vocab_16e6.txt.gz`.

  Prefers the copy shipped in `tvr_jax/assets/`; falls back to the one in an installed open_clip
  package, located through `importlib.util.find_spec` so that torch is not imported.

  Raises:
    FileNotFoundError: neither copy exists (the message names both places searched).
  """
  searched = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", VOCAB_FILENAME)]
  try:
    spec = importlib.util.find_spec("open_clip")
  except (ImportError, ValueError):
    spec = None
  if spec is not None and spec.submodule_search_locations:
    searched += [os.path.join(loc, VOCAB_FILENAME) for loc in spec.submodule_search_locations]
  for path in searched:
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"CLIP vocabulary {VOCAB_FILENAME} not found; looked in: "
                          + ", ".join(searched))


@functools.lru_cache(maxsize=None)
def _bytes_to_unicode() -> dict[int, str]:
  """Maps each byte 0..255 to a printable unicode character (CLIP/GPT-2's reversible table)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
        list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def clean_text(text: str) -> str:
  """Cleans `text` exactly as OpenAI/open_clip do before BPE ('lower' cleaning).

  ftfy.fix_text (mojibake, curly quotes, ...), html.unescape twice, whitespace collapsed to single
  spaces and stripped, lower-cased.
  """
  if not _PLAIN_ASCII.fullmatch(text):
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
  return " ".join(text.split()).lower()


class CLIPTokenizer:
  """CLIP's BPE tokenizer: `encode`/`decode` single texts, call on a batch for padded ids.

  Attributes:
    vocab_size: 49,408.
    sot_token_id: id of the start-of-text token (49406).
    eot_token_id: id of the end-of-text token (49407).
  """

  def __init__(self, vocab_path: str | None = None, cache_size: int = 1 << 18):
    """Loads the vocabulary.

    Args:
      vocab_path: a `bpe_simple_vocab_16e6.txt.gz`-format file; default `default_vocab_path()`.
      cache_size: how many distinct words keep their BPE ids in the LRU cache.

    Raises:
      FileNotFoundError / ValueError: the file is missing or not a CLIP vocabulary (message names it).
    """
    vocab_path = vocab_path or default_vocab_path()
    try:
      with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
      raise ValueError(f"cannot read CLIP vocabulary {vocab_path}: {e}") from e
    merge_lines = lines[1:_NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in merge_lines]
    bad = [i + 1 for i, m in enumerate(merges) if len(m) != 2]
    if len(merges) != _NUM_MERGES or bad:
      raise ValueError(f"{vocab_path} is not a CLIP BPE vocabulary: expected {_NUM_MERGES} merge "
                       f"lines after the header, got {len(merges)}"
                       + (f"; malformed lines {bad[:5]}" if bad else ""))
    self._byte_encoder = _bytes_to_unicode()
    self._byte_decoder = {v: k for k, v in self._byte_encoder.items()}
    vocab = list(self._byte_encoder.values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += [_SOT, _EOT]
    self._encoder = {tok: i for i, tok in enumerate(vocab)}
    self._decoder = vocab
    self._bpe_ranks = {m: i for i, m in enumerate(merges)}
    self.vocab_size = len(vocab)
    self.sot_token_id = self._encoder[_SOT]
    self.eot_token_id = self._encoder[_EOT]
    self._special = {_SOT: self.sot_token_id, _EOT: self.eot_token_id}
    self._cache_size = cache_size
    self._word_ids = functools.lru_cache(maxsize=cache_size)(self._word_ids_uncached)

  def __getstate__(self) -> dict:
    """Pickles without the word cache (e.g. to send the tokenizer to data-loader workers)."""
    state = self.__dict__.copy()
    del state["_word_ids"]
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._word_ids = functools.lru_cache(maxsize=self._cache_size)(self._word_ids_uncached)

  def _bpe(self, word: tuple[str, ...]) -> tuple[str, ...]:
    """Applies the merges to a byte-encoded word (last symbol already ends in `</w>`)."""
    ranks = self._bpe_ranks
    while len(word) > 1:
      # The lowest-ranked adjacent pair present in the word merges next.
      best, best_rank = None, None
      for pair in zip(word, word[1:]):
        r = ranks.get(pair)
        if r is not None and (best_rank is None or r < best_rank):
          best, best_rank = pair, r
      if best is None:
        break
      first, second = best
      merged = []
      i, n = 0, len(word)
      while i < n:
        if i < n - 1 and word[i] == first and word[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
    return word

  def _word_ids_uncached(self, word: str) -> tuple[int, ...]:
    """Ids of one regex word of cleaned text."""
    special = self._special.get(word)
    if special is not None:
      return (special,)
    symbols = [self._byte_encoder[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    return tuple(self._encoder[s] for s in self._bpe(tuple(symbols)))

  def encode(self, text: str) -> list[int]:
    """Cleans `text` and returns its BPE ids, without start/end tokens."""
    if not isinstance(text, str):
      raise TypeError(f"CLIPTokenizer.encode expects str, got {type(text).__name__}: {text!r:.80}")
    ids = []
    word_ids = self._word_ids
    for word in _WORD_PATTERN.findall(clean_text(text)):
      ids.extend(word_ids(word))
    return ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Turns ids back into text (word ends become spaces; the trailing space is dropped).

    Args:
      ids: token ids, e.g. one row of `tokenize`'s output.
      skip_special_tokens: drop start-of-text and stop at the first end-of-text (so zero padding
        after it, which would read as "!", is ignored). If False every id is decoded as is.

    Raises:
      ValueError: an id outside [0, vocab_size).
    """
    pieces = []
    for i in ids:
      i = int(i)
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} is outside the CLIP vocabulary [0, {self.vocab_size})")
      if skip_special_tokens:
        if i == self.eot_token_id:
          break
        if i == self.sot_token_id:
          continue
      pieces.append(self._decoder[i])
    text = "".join(pieces)
    # Special tokens are plain ASCII, which the byte table maps to itself.
    data = bytearray(self._byte_decoder[c] for c in text)
    return data.decode("utf-8", errors="replace").replace("</w>", " ").rstrip(" ")

  def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
    """Tokenizes a batch as open_clip does: `[SOT] + bpe + [EOT]`, zero-padded.

    Args:
      texts: one string or a sequence of strings.
      context_length: columns of the result; longer texts are truncated to `context_length` ids
        whose last one is replaced by EOT (so every row ends in EOT).

    Returns:
      int32 array [len(texts), context_length].
    """
    if isinstance(texts, str):
      texts = [texts]
    if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
      raise TypeError(f"context_length must be an int, got {context_length!r}")
    if context_length < 2:
      raise ValueError(f"context_length must be at least 2 (start and end tokens), got "
                       f"{context_length}")
    n = len(texts)
    out = np.zeros((n, context_length), dtype=np.int32)
    iterator = texts
    if n >= 50_000:  # a few seconds of work: show progress
      from tqdm.auto import tqdm
      iterator = tqdm(texts, desc="tokenize", unit="text", leave=False)
    sot, eot = self.sot_token_id, self.eot_token_id
    for row, text in enumerate(iterator):
      if not isinstance(text, str):
        raise TypeError(f"tokenize: texts[{row}] is {type(text).__name__}, not str: {text!r:.80}")
      ids = self.encode(text)
      if len(ids) > context_length - 2:
        ids = ids[:context_length - 2]
      out[row, 0] = sot
      out[row, 1:len(ids) + 1] = ids
      out[row, len(ids) + 1] = eot
    return out


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> CLIPTokenizer:
  """The process-wide default `CLIPTokenizer` (vocabulary loaded once, ~0.3 s)."""
  return CLIPTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
  """Tokenizes text(s) for CLIP, identical to `open_clip.tokenize` but returning numpy.

  Args:
    texts: one string or a sequence of strings.
    context_length: columns of the result (77 for CLIP; CLIP4Clip-style training uses 32).

  Returns:
    int32 array [N, context_length]: `[SOT=49406] + bpe + [EOT=49407]`, zero padding; a text too
    long is cut to `context_length` ids whose last is EOT.
  """
  return get_tokenizer()(texts, context_length=context_length)
