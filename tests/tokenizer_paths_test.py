"""Tests of tvr_jax.tokenizer's two word-splitting paths and its edge cases, against open_clip.

ASCII text is split by `tokenizers`' Rust regex, everything else by Python's `regex` module; these
tests check that the two paths agree where both apply, that the Python path is really needed where
the Rust regex differs, and edge cases (empty, very long, non-ASCII, HTML entities, special tokens,
chunked batches) against open_clip's own tokenizer.
"""

import pickle
import random

import numpy as np
import pytest
import tokenizers
from tokenizers import pre_tokenizers

from conftest import import_open_clip
from tvr_jax import tokenizer as tok_lib

# Code points that the Rust regex engine classifies differently from Python's `regex` (found by
# comparing both on every code point): U+0345 (case-folds to a letter under IGNORECASE, so open_clip
# drops it), U+0558 / U+0C5C / U+A7CE (assigned after the Rust engine's Unicode table), and U+017F
# (long s: under case folding "'ſ" is the contraction "'s").
_RUST_REGEX_DIFFERS = ["a\u0345b", "x\u0558y \u0558\u0558", "a\u0c5cb1", "a\ua7ceb", "it'\u017f"]


@pytest.fixture(scope="module")
def open_clip():
  return import_open_clip()


@pytest.fixture(scope="module")
def tok():
  return tok_lib.CLIPTokenizer()


def _assert_equal_open_clip(open_clip, texts, context_length=77):
  ours = tok_lib.tokenize(texts, context_length=context_length)
  ref = open_clip.tokenize(texts, context_length=context_length).numpy()
  assert ours.dtype == np.int32 and ours.shape == (len(texts), context_length)
  bad = np.flatnonzero((ours != ref).any(axis=1))
  assert bad.size == 0, (f"{texts[bad[0]]!r:.200}\nours {ours[bad[0]].tolist()}\n"
                         f"ref  {ref[bad[0]].tolist()}")
  return ours


def _ascii_texts(n=2000, seed=0):
  """Cleaned ASCII texts over every printable character, so each regex branch is hit."""
  rng = random.Random(seed)
  alphabet = [chr(c) for c in range(0x20, 0x7f)] + ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d",
                                                    "don't", "dog", "123", " "] * 3
  return [tok_lib.clean_text("".join(rng.choices(alphabet, k=rng.randint(0, 60))))
          for _ in range(n)]


def test_rust_and_python_word_paths_agree_on_ascii(tok):
  texts = _ascii_texts()
  assert all(t.isascii() for t in texts)
  rust = [e.ids for e in tok._text.encode_batch_fast(texts, add_special_tokens=False)]
  words = [tok_lib._WORD_PATTERN.findall(t) for t in texts]
  python = [e.ids for e in tok._words.encode_batch_fast(words, is_pretokenized=True,
                                                        add_special_tokens=False)]
  assert rust == python
  assert sum(map(len, rust)) > 20 * len(texts)  # real work, not empty encodings
  # The routing sends ASCII through the Rust path; the public result is the same either way.
  assert tok._encode_cleaned(texts) == rust


def test_python_path_where_rust_regex_differs(open_clip, tok):
  # Guard: on these texts the Rust splitter with the same regex gives other words than Python's.
  rust_split = pre_tokenizers.Split(tokenizers.Regex(tok_lib._WORDS_REGEX), behavior="removed",
                                    invert=True)
  for text in _RUST_REGEX_DIFFERS:
    rust_words = [w for w, _ in rust_split.pre_tokenize_str(text)]
    assert rust_words != tok_lib._WORD_PATTERN.findall(text), repr(text)
  _assert_equal_open_clip(open_clip, _RUST_REGEX_DIFFERS)
  ref_tok = open_clip.get_tokenizer("ViT-B-32")
  for text in _RUST_REGEX_DIFFERS:
    assert tok.encode(text) == ref_tok.encode(text), repr(text)


def test_special_token_literals(open_clip, tok):
  texts = ["a <start_of_text> b", "x<end_of_text>y", "!<start_of_text>", "<START_OF_TEXT>",
           "<\u017ftart_of_text>", "<end_of_text><end_of_text>", "_of_text> plain", "<|endoftext|>",
           "日本<end_of_text>語"]
  ours = _assert_equal_open_clip(open_clip, texts)
  assert ours[0].tolist()[:5] == [49406, 320, 49406, 321, 49407]
  assert 49406 not in ours[2, 1:]  # the "<" joins the punctuation run "!<", as in open_clip
  # Under case folding "<\u017ftart_of_text>" is one regex word, but only the exact spelling is
  # the special token: this word is BPE-encoded, as in open_clip.
  assert 49406 not in ours[4, 1:] and 49407 in ours[4, 3:]


def test_empty_and_whitespace_only(open_clip, tok):
  texts = ["", " ", "\t\n\r ", "\u3000\u00a0", "\u200b", "\x00", "&nbsp;"]
  ours = _assert_equal_open_clip(open_clip, texts, context_length=8)
  assert ours[0].tolist() == [49406, 49407] + [0] * 6
  assert tok.encode("") == [] and tok.decode(ours[0]) == ""
  assert tok_lib.tokenize([], context_length=5).shape == (0, 5)


def test_very_long_texts(open_clip, tok):
  rng = random.Random(3)
  texts = ["word " * 20000, "x" * 100_000, " ".join(str(rng.random()) for _ in range(3000)),
           "日本語のテキスト" * 2000, "&amp;" * 5000]
  for length in (77, 32, 2):
    ours = _assert_equal_open_clip(open_clip, texts, context_length=length)
    assert (ours[:, -1] == 49407).all()
  assert len(tok.encode(texts[0])) == 20000


def test_non_ascii_and_html_entities(open_clip, tok):
  texts = ["naïve café über straße", "日本語 中文 한국어 русский ελληνικά العربية עברית हिन्दी",
           "cafÃ© donâ€™t", "“curly” ‘quotes’", "😀👍🏽👨‍👩‍👧🇯🇵", "ﬁne ﬂow Ｆｕｌｌ",
           "&amp;lt;b&amp;gt; bold &lt;/b&gt;", "&#39;quoted&#39; &quot;x&quot; &eacute;t&eacute;",
           "&#128512; &copy; &bogus; & alone", "İstanbul ΣΊΣΥΦΟΣ ǅemal", "٣ ५ Ⅻ ½ ²"]
  ours = _assert_equal_open_clip(open_clip, texts)
  _assert_equal_open_clip(open_clip, texts, context_length=16)
  assert tok.decode(ours[6]) == "< b > bold </ b >"  # entities unescaped twice
  assert tok.decode(ours[0]) == "naïve café über straße"


def test_bpe_of_every_vocabulary_word_equals_open_clip(open_clip, tok):
  ref_tok = open_clip.get_tokenizer("ViT-B-32")
  # Each whole-word token decoded back to text: BPE must give what open_clip gives.
  ids = [i for i in range(512, 49406) if tok.decode([i], skip_special_tokens=False) and
         tok._text.id_to_token(i).endswith("</w>")]
  assert len(ids) > 20000
  texts = [tok.decode([i]) for i in ids]
  ours = tok._encode_cleaned([tok_lib.clean_text(t) for t in texts])
  bad = [(t, o) for t, o in zip(texts, ours) if o != ref_tok.encode(t)]
  assert not bad, f"{len(bad)} words differ, e.g. {bad[:3]}"
  # Most decode to one valid word, which BPE must give back as the single vocabulary id.
  assert sum(o == [i] for o, i in zip(ours, ids)) > 0.9 * len(ids)


def test_chunked_batches_equal_one_call(monkeypatch, tok):
  texts = _ascii_texts(50, seed=1) + ["naïve", "a <end_of_text>", ""] * 5
  whole = tok(texts, context_length=20)
  singles = np.concatenate([tok([t], context_length=20) for t in texts])
  np.testing.assert_array_equal(whole, singles)
  monkeypatch.setattr(tok_lib, "_CHUNK", 7)
  np.testing.assert_array_equal(tok(texts, context_length=20), whole)
  with pytest.raises(TypeError, match=r"texts\[60\]"):
    tok(texts[:60] + [None], context_length=20)


def test_cache_size_does_not_change_ids_and_pickle_is_small(tok):
  texts = ["a dog runs on the beach", "supercalifragilistic naïve", "日本語"] * 3
  uncached = tok_lib.CLIPTokenizer(cache_size=0)
  np.testing.assert_array_equal(uncached(texts), tok(texts))
  blob = pickle.dumps(uncached)
  assert len(blob) < 1000  # the path, not the vocabulary
  clone = pickle.loads(blob)
  np.testing.assert_array_equal(clone(texts), tok(texts))
  assert clone._cache_size == 0 and clone._vocab_path == tok._vocab_path
