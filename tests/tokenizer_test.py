"""Tests for tvr_jax.tokenizer: ids identical to open_clip's tokenizer on varied, messy captions."""

import gzip
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, import_open_clip
from tvr_jax import tokenizer as tok_lib

_WORDS = ("a man woman dog cat is are playing guitar running on the beach in park with ball red "
          "blue car drives road people dancing cooking kitchen video shows child swims pool "
          "football basketball tennis news reporter talks about weather A Man IS PLAYING "
          "Guitar ThE").split()
_NUMBERS = ["0", "7", "42", "3.14", "1,000", "2nd", "1990s", "10:30", "-5", "100%", "$20", "v2.0",
            "٣", "५", "Ⅻ", "½", "²"]
_PUNCT = list(".,!?;:'\"()-[]{}/\\@#$%^*_+=<>|~`") + ["...", "…", "—", "–", "!!", "?!", "-->"]
_CONTRACTIONS = ["don't", "it's", "we're", "I'M", "they'll", "she'd", "you've", "O'Neil",
                 "rock'n'roll"]
_SCRIPTS = ["日本語のテキスト", "中文字幕", "한국어 문장", "русский текст", "ελληνικά", "العربية",
            "עברית", "हिन्दी", "ภาษาไทย", "Ünïcödé", "naïve façade", "straße", "ﬁne ﬂow",
            "Ｆｕｌｌｗｉｄｔｈ", "ǅemal", "İstanbul", "ΣΊΣΥΦΟΣ"]
_EMOJI = ["😀", "👍🏽", "👨‍👩‍👧", "🇯🇵", "❤️", "🎸🎶", "☃", "✓"]
_ENTITIES = ["&amp;", "&#39;", "&lt;b&gt;", "&quot;", "&amp;amp;", "&nbsp;", "&#x27;", "&eacute;",
             "&lt;i&gt;italics&lt;/i&gt;", "&amp;lt;", "&", "&#128512;", "&copy;", "&bogus;"]
_MOJIBAKE = ["cafÃ©", "Ã¼ber", "â€™", "donâ€™t", "Ã±andu", "naÃ¯ve", "â€œquotedâ€\x9d", "Ã\xa0 la"]
_QUOTES = ["“", "”", "‘", "’", "«", "»", "„", "‚", "“curly”", "‘single’", "it’s"]
_SPACES = ["\t", "\n", "\r\n", "  ", "\u00a0", "\u2003", "\u3000", "\r", "\x0b", "\x0c"]
_CONTROL = ["\x00", "\x1b[31m", "\x7f", "\u200b", "\ufeff", "\x85", "\x1c", "\u2028"]
_MARKER_LITERALS = ["<start_of_text>", "<end_of_text>", "<|startoftext|>", "<|endoftext|>"]


def _random_word(rng: random.Random) -> str:
  """A rare (mostly unseen) word, so BPE runs many merges outside the cache."""
  return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzéäøñ") for _ in range(rng.randint(1, 18)))


def _random_codepoints(rng: random.Random) -> str:
  """A few random code points from the BMP and beyond (no surrogates)."""
  out = []
  for _ in range(rng.randint(1, 4)):
    c = rng.randint(0x20, 0x2FFFF)
    if 0xD800 <= c <= 0xDFFF:
      c = 0x4E00
    out.append(chr(c))
  return "".join(out)


def _captions(n: int = 1200, seed: int = 0) -> list[str]:
  """`n` random messy captions plus fixed edge cases."""
  rng = random.Random(seed)
  groups = [(_WORDS, 30), (_NUMBERS, 5), (_PUNCT, 6), (_CONTRACTIONS, 3), (_SCRIPTS, 3),
            (_EMOJI, 2), (_ENTITIES, 3), (_MOJIBAKE, 2), (_QUOTES, 2), (_MARKER_LITERALS, 1),
            (_CONTROL, 1)]
  pools = [g for g, _ in groups]
  weights = [w for _, w in groups]
  captions = []
  for _ in range(n):
    parts = []
    for _ in range(rng.randint(1, 45)):
      r = rng.random()
      if r < 0.08:
        parts.append(_random_word(rng))
      elif r < 0.11:
        parts.append(_random_codepoints(rng))
      else:
        parts.append(rng.choice(rng.choices(pools, weights)[0]))
      parts.append(rng.choice([" "] * 8 + ["", ""] + _SPACES))
    captions.append("".join(parts))
  captions += [
      "", " ", "\t\n ", "a", "A.", "&amp;", "cafÃ©", "“”",
      "a " * 75,  # exactly 75 words: fills 77 with SOT/EOT
      "a " * 76,  # one too many: truncated
      "a " * 30 + "b " * 31,  # truncation boundary at 32
      " ".join(["supercalifragilisticexpialidocious"] * 40),  # very long, multi-token words
      "the quick brown fox jumps over the lazy dog. " * 20,
      "x" * 500,
      "😀" * 100,
  ]
  return captions


@pytest.fixture(scope="module")
def open_clip():
  return import_open_clip()


@pytest.fixture(scope="module")
def captions():
  return _captions()


@pytest.mark.parametrize("context_length", [77, 32])
def test_ids_equal_open_clip(open_clip, captions, context_length):
  ours = tok_lib.tokenize(captions, context_length=context_length)
  ref = open_clip.tokenize(captions, context_length=context_length).numpy()
  assert ours.dtype == np.int32 and ours.shape == (len(captions), context_length)
  mismatch = np.flatnonzero((ours != ref).any(axis=1))
  assert mismatch.size == 0, (
      f"{mismatch.size} captions differ, first {captions[mismatch[0]]!r}:\n"
      f"ours {ours[mismatch[0]].tolist()}\nref  {ref[mismatch[0]].tolist()}")
  # The set must actually exercise truncation and padding.
  assert (ref[:, -1] == 49407).sum() >= 10 and (ref[:, -1] == 0).sum() >= 10


def test_encode_and_cleaning_equal_open_clip(open_clip, captions):
  ref_tok = open_clip.get_tokenizer("ViT-B-32")
  oc_tokenizer = open_clip.tokenizer
  ours = tok_lib.CLIPTokenizer()
  for text in captions:
    # Covers the plain-ASCII shortcut of clean_text as well as the ftfy path.
    assert tok_lib.clean_text(text) == oc_tokenizer._clean_lower(text), repr(text)
    assert ours.encode(text) == ref_tok.encode(text), repr(text)


def test_vocabulary_matches_open_clip(open_clip):
  ours = tok_lib.CLIPTokenizer()
  ref = open_clip.tokenizer.SimpleTokenizer()
  assert ours.vocab_size == len(ref.encoder) == 49408
  assert (ours.sot_token_id, ours.eot_token_id) == (ref.sot_token_id, ref.eot_token_id)
  assert (ours.sot_token_id, ours.eot_token_id) == (49406, 49407)
  ids = (0, 256, 511, 512, 30000, 49405)
  assert [ours.decode([i], skip_special_tokens=False) for i in ids] == [
      ref.decode([i]).rstrip(" ") for i in ids]


def test_truncation_keeps_eot():
  tok = tok_lib.CLIPTokenizer()
  text = " ".join(f"word{i}" for i in range(100))
  full = tok.encode(text)
  assert len(full) > 77
  for length in (77, 32, 2):
    row = tok_lib.tokenize(text, context_length=length)[0]
    assert row[0] == 49406 and row[-1] == 49407
    assert row[1:-1].tolist() == full[:length - 2]
  short = tok_lib.tokenize("a dog", context_length=8)[0]
  assert short.tolist() == ([49406] + tok.encode("a dog") + [49407]
                            + [0] * (8 - 2 - len(tok.encode("a dog"))))


def test_decode_round_trips_plain_text():
  tok = tok_lib.CLIPTokenizer()
  for text in ["a man is playing a guitar on the stage", "supercalifragilisticexpialidocious",
               "naïve café über 日本語", "two dogs , one ball ! 4 2 times ?"]:
    assert tok.decode(tok.encode(text)) == text
    row = tok_lib.tokenize(text)[0]
    assert tok.decode(row) == text  # SOT dropped, stops at EOT, padding ignored
  # Every regex word ends in `</w>`, so decoding puts a space after punctuation and each digit.
  assert (tok.decode(tok.encode("Two dogs, one ball! 42 times?"))
          == "two dogs , one ball ! 4 2 times ?")
  assert (tok.decode([49406, 320, 49407, 0], skip_special_tokens=False)
          == "<start_of_text>a <end_of_text>!")


def test_bad_input_raises_clear_errors(tmp_path):
  tok = tok_lib.CLIPTokenizer()
  with pytest.raises(ValueError, match="context_length"):
    tok_lib.tokenize("a", context_length=1)
  with pytest.raises(TypeError, match=r"texts\[1\]"):
    tok_lib.tokenize(["a", b"bytes"])
  with pytest.raises(ValueError, match="49408"):
    tok.decode([49408])
  bad = tmp_path / "vocab.txt.gz"
  with gzip.open(bad, "wt") as f:
    f.write("#version\ni n\n")
  with pytest.raises(ValueError, match="vocab.txt.gz"):
    tok_lib.CLIPTokenizer(str(bad))
  with pytest.raises(ValueError, match="nothere.gz"):
    tok_lib.CLIPTokenizer(str(tmp_path / "nothere.gz"))


def test_pickles_for_worker_processes():
  tok = tok_lib.CLIPTokenizer()
  texts = ["a dog runs", "cafÃ© &amp; “tea”", "日本語"]
  before = tok(texts)
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone(texts), before)
  assert clone.encode("a dog") == tok.encode("a dog") and clone.eot_token_id == 49407


def test_single_string_and_default_path():
  assert tok_lib.tokenize("a dog").shape == (1, 77)
  path = tok_lib.default_vocab_path()
  assert path == os.path.join(REPO_ROOT, "tvr_jax", "assets", tok_lib.VOCAB_FILENAME)


def test_lazy_export_without_torch_or_jax():
  code = ("import sys, tvr_jax\n"
          "ids = tvr_jax.tokenize(['a dog runs'], context_length=16)\n"
          "from tvr_jax.tokenizer import tokenize\n"
          "assert tvr_jax.tokenize is tokenize\n"
          "print(ids.tolist(), 'torch' in sys.modules, 'jax' in sys.modules)\n")
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=REPO_ROOT, timeout=120, check=True).stdout.split()
  tok = tok_lib.CLIPTokenizer()
  expected = [49406] + tok.encode("a dog runs") + [49407]
  assert out[-2:] == ["False", "False"]
  assert eval(" ".join(out[:-2])) == [expected + [0] * (16 - len(expected))]


def test_plain_ascii_shortcut_equals_full_cleaning(open_clip):
  # Random strings over all 128 ASCII characters straddle the shortcut's character set (control
  # characters, '&', '\x0b', '\r'), so both branches of clean_text meet open_clip's cleaning.
  rng = random.Random(1)
  alphabet = [chr(c) for c in range(128)] + ["&amp;", "&lt;", "&#39;", "\r\n"] * 4
  texts = ["".join(rng.choices(alphabet, k=rng.randint(0, 30))) for _ in range(3000)]
  shortcut = sum(bool(tok_lib._PLAIN_ASCII.fullmatch(t)) for t in texts)
  assert 100 < shortcut < len(texts) - 100
  for text in texts:
    assert tok_lib.clean_text(text) == open_clip.tokenizer._clean_lower(text), repr(text)
