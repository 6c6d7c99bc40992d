"""The exact CLIP tokenizer, offline, on Hugging Face `tokenizers` (its Rust byte-pair encoder).

Gives the same ids as open_clip (`open_clip.tokenize`): the same text cleaning (`ftfy.fix_text`,
`html.unescape` twice, whitespace collapsed, lower-cased), the same word-splitting regex and the
same 49,408-token vocabulary. The vocabulary ships in `tvr_jax/assets/bpe_simple_vocab_16e6.txt.gz`
(MIT, OpenAI); if that copy is missing, the one inside an installed open_clip package is used (found
without importing open_clip, which would import torch). The BPE model is built in memory from that
file: nothing is downloaded and nothing is written.

Cleaning stays in Python (ftfy has no Rust counterpart). Words are split in one of two ways:
- ASCII text (almost every caption): `tokenizers` splits with the same regex, in Rust.
- Any other text, or text that contains a literal special token: Python's `regex` module splits it
  and `tokenizers` gets the words pre-split. The Rust regex engine has an older Unicode table and
  no case-folding, so on ~17,000 code points (e.g. U+0345, letters new in Unicode 16) it would split
  differently from open_clip; on ASCII both engines agree.

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
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

__all__ = ["CLIPTokenizer", "clean_text", "default_vocab_path", "get_tokenizer", "load_vocabulary",
           "tokenize"]

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# Lines 1 .. 48,894 of the vocabulary file are the merges (line 0 is a header), so that
# 256 bytes + 256 bytes with `</w>` + 48,894 merges + 2 special tokens = 49,408 ids.
_NUM_MERGES = 49152 - 256 - 2
_SOT = "<start_of_text>"
_EOT = "<end_of_text>"
_WORD_END = "</w>"
# CLIP's word regex without the special tokens; every digit is a word of its own.
_WORDS_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# open_clip's full pattern (OpenAI's with its own special-token spelling). A caption that literally
# contains "<start_of_text>" / "<end_of_text>" gets the special id there, exactly as in open_clip;
# "!<start_of_text>" is not special there, because the punctuation run swallows the "<".
_WORD_PATTERN = regex.compile(_SOT + "|" + _EOT + "|" + _WORDS_REGEX, regex.IGNORECASE)
# Only a word spelled exactly like a special token gets its id (so "<\u017ftart_of_text>", one word
# under the regex's case folding, is BPE-encoded as in open_clip). Text without this substring has
# no such word and can take the Rust path, whose regex has no special-token branches.
_SPECIAL_MARK = "_of_text>"
# Printable ASCII without '&', plus tab / newline / carriage return. On such text ftfy.fix_text
# changes nothing that survives whitespace collapsing (no mojibake, entities, curly quotes, control
# or width characters; it only turns '\r' into '\n'), and html.unescape has nothing to unescape,
# so cleaning can skip both. The open_clip comparison test exercises this path.
_PLAIN_ASCII = regex.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")
# Texts per call into `tokenizers`: bounds the Encoding objects alive at once; progress steps.
_CHUNK = 8192


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
  """Maps each byte 0..255 to a printable unicode character (CLIP/GPT-2's reversible table).

  `tokenizers`' ByteLevel pre-tokenizer uses the same table; the vocabulary is spelled in it.
  """
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


def load_vocabulary(vocab_path: str | None = None) -> tuple[list[str], list[tuple[str, str]]]:
  """Reads a `bpe_simple_vocab_16e6.txt.gz`-format file into CLIP's token list and merges.

  Args:
    vocab_path: the file; default `default_vocab_path()`.

  Returns:
    (tokens, merges): the 49,408 token strings in id order (256 byte symbols, the same with `</w>`,
    one per merge, then `<start_of_text>`, `<end_of_text>`), spelled in the byte-to-unicode table;
    and the 48,894 merges in rank order. What a BPE `vocab.json` / `merges.txt` pair holds.

  Raises:
    ValueError: the file is missing, unreadable or not a CLIP vocabulary (message names it).
  """
  vocab_path = vocab_path or default_vocab_path()
  try:
    with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise ValueError(f"cannot read CLIP vocabulary {vocab_path}: {e}") from e
  merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
  bad = [i + 1 for i, m in enumerate(merges) if len(m) != 2]
  if len(merges) != _NUM_MERGES or bad:
    raise ValueError(f"{vocab_path} is not a CLIP BPE vocabulary: expected {_NUM_MERGES} merge "
                     f"lines after the header, got {len(merges)}"
                     + (f"; malformed lines {bad[:5]}" if bad else ""))
  symbols = list(_bytes_to_unicode().values())
  tokens = symbols + [s + _WORD_END for s in symbols] + ["".join(m) for m in merges] + [_SOT, _EOT]
  return tokens, merges


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
    """Builds the BPE model in memory from the vocabulary file (~0.15 s).

    Args:
      vocab_path: a `bpe_simple_vocab_16e6.txt.gz`-format file; default `default_vocab_path()`.
      cache_size: how many distinct words `tokenizers` keeps the BPE result of (the first ones
        seen; it does not evict).

    Raises:
      FileNotFoundError / ValueError: the file is missing or not a CLIP vocabulary (the message
        names it).
    """
    self._vocab_path = vocab_path or default_vocab_path()
    self._cache_size = int(cache_size)
    vocab, merges = load_vocabulary(self._vocab_path)
    model = models.BPE(vocab={tok: i for i, tok in enumerate(vocab)}, merges=merges,
                       cache_capacity=self._cache_size, continuing_subword_prefix="",
                       end_of_word_suffix=_WORD_END, fuse_unk=False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # Both share `model` (and so its word cache). `_text` splits words itself (ASCII text only);
    # `_words` takes words split in Python, where special tokens arrive as words of their own.
    self._text = tokenizers.Tokenizer(model)
    self._text.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_WORDS_REGEX), behavior="removed", invert=True),
        byte_level])
    self._text.decoder = decoders.ByteLevel()
    self._words = tokenizers.Tokenizer(model)
    self._words.pre_tokenizer = byte_level
    self._words.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                    for t in (_SOT, _EOT)])
    self.vocab_size = self._text.get_vocab_size()
    self.sot_token_id = self._text.token_to_id(_SOT)
    self.eot_token_id = self._text.token_to_id(_EOT)
    if self.vocab_size != len(vocab) or (self.sot_token_id, self.eot_token_id) != (
        len(vocab) - 2, len(vocab) - 1):
      raise ValueError(f"{self._vocab_path}: the BPE model has {self.vocab_size} ids, expected "
                       f"{len(vocab)} with the special tokens last")

  def __getstate__(self) -> dict:
    """Pickles as the vocabulary path (e.g. to send the tokenizer to data-loader workers)."""
    return {"vocab_path": self._vocab_path, "cache_size": self._cache_size}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["vocab_path"], state["cache_size"])

  def _encode_cleaned(self, cleaned: Sequence[str]) -> list[list[int]]:
    """BPE ids (no start/end tokens) of already cleaned texts, one list per text."""
    text_rows, text_batch, word_rows, word_batch = [], [], [], []
    for row, text in enumerate(cleaned):
      if text.isascii() and _SPECIAL_MARK not in text:
        text_rows.append(row)
        text_batch.append(text)
      else:
        word_rows.append(row)
        word_batch.append(_WORD_PATTERN.findall(text))
    out: list[list[int]] = [[] for _ in cleaned]
    if text_batch:
      encodings = self._text.encode_batch_fast(text_batch, add_special_tokens=False)
      for row, enc in zip(text_rows, encodings):
        out[row] = enc.ids
    if word_batch:
      encodings = self._words.encode_batch_fast(word_batch, is_pretokenized=True,
                                                add_special_tokens=False)
      for row, enc in zip(word_rows, encodings):
        out[row] = enc.ids
    return out

  def encode(self, text: str) -> list[int]:
    """Cleans `text` and returns its BPE ids, without start/end tokens."""
    if not isinstance(text, str):
      raise TypeError(f"CLIPTokenizer.encode expects str, got {type(text).__name__}: {text!r:.80}")
    return self._encode_cleaned([clean_text(text)])[0]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Turns ids back into text (word ends become spaces; the trailing space is dropped).

    Args:
      ids: token ids, e.g. one row of `tokenize`'s output.
      skip_special_tokens: drop start-of-text and stop at the first end-of-text (so zero padding
        after it, which would read as "!", is ignored). If False every id is decoded as is.

    Raises:
      ValueError: an id outside [0, vocab_size).
    """
    kept = []
    for i in ids:
      i = int(i)
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} is outside the CLIP vocabulary [0, {self.vocab_size})")
      if skip_special_tokens:
        if i == self.eot_token_id:
          break
        if i == self.sot_token_id:
          continue
      kept.append(i)
    # `_text` has no added tokens, so the special ids decode through the byte table like any other
    # token (their characters are plain ASCII, which the table maps to themselves).
    text = self._text.decode(kept, skip_special_tokens=False)
    return text.replace(_WORD_END, " ").rstrip(" ")

  def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
    """Tokenizes a batch as open_clip does: `[SOT] + bpe + [EOT]`, zero-padded.

    Args:
      texts: one string or a sequence of strings.
      context_length: columns of the result; a longer text keeps its first `context_length - 2`
        BPE ids, so every row still ends in EOT.

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
    out[:, 0] = self.sot_token_id
    starts = range(0, n, _CHUNK)
    if n >= 50_000:  # a few seconds of work: show progress
      from tqdm.auto import tqdm
      starts = tqdm(starts, desc="tokenize", unit="chunk", leave=False)
    keep, eot = context_length - 2, self.eot_token_id
    for start in starts:
      cleaned = []
      for row in range(start, min(start + _CHUNK, n)):
        text = texts[row]
        if not isinstance(text, str):
          raise TypeError(f"tokenize: texts[{row}] is {type(text).__name__}, not str: {text!r:.80}")
        cleaned.append(clean_text(text))
      for row, ids in enumerate(self._encode_cleaned(cleaned), start):
        k = min(len(ids), keep)
        out[row, 1:k + 1] = ids[:k]
        out[row, k + 1] = eot
    return out


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> CLIPTokenizer:
  """The process-wide default `CLIPTokenizer` (built once, on first use, ~0.15 s)."""
  return CLIPTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
  """Tokenizes text(s) for CLIP, identical to `open_clip.tokenize` but returning numpy.

  Args:
    texts: one string or a sequence of strings.
    context_length: columns of the result (77 for CLIP; CLIP4Clip-style training uses 32).

  Returns:
    int32 array [N, context_length]: `[SOT=49406] + bpe + [EOT=49407]`, zero padding; a text too
    long keeps its first `context_length - 2` BPE ids and still ends in EOT.
  """
  return get_tokenizer()(texts, context_length=context_length)
