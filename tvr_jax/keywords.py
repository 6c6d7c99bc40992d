"""English keyword masks for keyword weighting: which BPE tokens belong to content words.

Keyword weighting gives the BPE tokens of keywords text-mask value 2 (they count double in the
word-branch averages). A keyword is a word that is a noun, adjective or verb in its sentence and
not in `STOP_WORDS`. `keyword_mask` marks those tokens, aligned column for column with
`tvr_jax.tokenizer.tokenize(texts, context_length)`:

  ids = tokenize(texts, 32)               # int32 [N, 32]
  kw = keyword_mask(texts, 32)            # int32 [N, 32], 1 = keyword token
  model.encode_text(ids, kw)              # mask 2 on keywords when keyword_weighting is on

Part of speech comes from TextBlob's English Brill tagger (Tom de Smedt's pattern tagger: a
~100k-word lexicon, suffix rules for unknown words and contextual rules that revise a word's tag
from its neighbours). Its lexicon and rules ship inside the `textblob` wheel, so nothing is
downloaded; the tags are Penn Treebank tags (NN*, JJ*, VB* are keywords).

Alignment uses only the public `tokenize`: the text is cleaned and split into CLIP's pre-tokens
(the tokenizer's word regex), and each pre-token's BPE piece count is `tokenize([pre_token])`
minus start/end (cached per pre-token), so the pieces of consecutive pre-tokens fill consecutive
columns after the start token, truncated where `tokenize` truncates.
"""

from __future__ import annotations

import functools
import html
from typing import Sequence

import ftfy
import numpy as np
import regex

from tvr_jax.tokenizer import tokenize

__all__ = ["KEYWORD_TAGS", "STOP_WORDS", "keyword_mask", "keyword_words"]

# CLIP's pre-tokenizer regex (open_clip's spelling of the special tokens, as `tokenize` uses).
_PRE_TOKEN = regex.compile(
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)
_LETTERS = regex.compile(r"[\p{L}]+")
# Printable ASCII without '&' plus tab/newline/CR: ftfy and html.unescape leave such text as it is
# (after whitespace collapsing), so cleaning skips them there.
_PLAIN_ASCII = regex.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")

# Penn Treebank tag prefixes of keywords: nouns (incl. proper), adjectives, verbs.
KEYWORD_TAGS = ("NN", "JJ", "VB")

# Closed-class and near-empty English words that are never keywords, whatever their tag: articles
# and determiners, pronouns (incl. "someone", "something"), prepositions and particles,
# conjunctions, auxiliaries and modals (every form of be / have / do), quantifiers, common adverbs,
# and the stems CLIP's pre-tokenizer leaves before a clitic ("don" of "don't", "isn" of "isn't").
# Content verbs such as "get", "make", "go" stay keywords.
STOP_WORDS = frozenset("""
a an the this that these those some any each every either neither no all both half
i me my mine myself we us our ours ourselves you your yours yourself yourselves
he him his himself she her hers herself it its itself they them their theirs themselves
one ones someone somebody something anyone anybody anything everyone everybody everything
noone nobody nothing none another other others such own same what which who whom whose
whoever whatever whichever
of in on at to into onto upon from with without within by for about above below over under
between among through throughout during before after behind beside besides near next against
along across around toward towards beyond via off up down out away back per than like unlike
and or but nor so yet if then else because while as until unless although though whether
since once where when why how there here
be am is are was were been being have has had having do does did doing done
can could may might must shall should will would ought
not very too also just only even still again ever always never often sometimes already
now soon really quite rather almost more most much many several few less least lot lots
s t re ve m ll d don doesn didn isn aren wasn weren hasn haven hadn won wouldn shouldn couldn
cannot mustn needn ain
oh ok okay yes yeah hey hi um uh
""".split())


def _clean(text: str) -> str:
  """CLIP's text cleaning: ftfy.fix_text, html.unescape twice, whitespace collapsed, lower-cased."""
  if not _PLAIN_ASCII.fullmatch(text):
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
  return " ".join(text.split()).lower()


@functools.lru_cache(maxsize=1 << 18)
def _num_pieces(pre_token: str) -> int:
  """Number of BPE tokens `tokenize` gives one pre-token (without start/end)."""
  # A word never has more BPE pieces than UTF-8 bytes, so this length never truncates. Id 0 is
  # a real token ("!") as well as padding, and the literal "<end_of_text>" is the end id, so the
  # count is the position of the LAST end token minus the start token.
  ids = tokenize([pre_token], context_length=len(pre_token.encode("utf-8")) + 2)[0]
  return int(np.flatnonzero(ids == _eot_id())[-1]) - 1


@functools.lru_cache(maxsize=1)
def _eot_id() -> int:
  """The end-of-text id, read off `tokenize` itself."""
  return int(tokenize([""], context_length=2)[0, 1])


@functools.lru_cache(maxsize=1)
def _tagger():
  """TextBlob's Brill tagger with its lexical and contextual rules: tokens -> Penn tags."""
  try:
    from textblob import en as textblob_en
    from textblob._text import Context, find_tags
  except ImportError as e:  # not installed, or a version without the pattern tagger
    raise ImportError("keyword masks need textblob (pip install textblob==0.20.1): "
                      f"{e}") from e
  lexicon = textblob_en.lexicon
  context = Context(lexicon, path=lexicon.context.path)
  # One shipped rule, "NN PRP PREVWD are mine", gives PREVWD (one argument) two: applied as
  # written it retags EVERY noun after "are" as a pronoun ("people are dancing" -> dancing/PRP).
  # Its evident meaning is the word bigram "are mine" (LBIGRAM: previous word, this word).
  rules = list(context)  # loads the rule file
  context[:] = [r[:2] + ["LBIGRAM"] + r[3:] if r[2].lower() == "prevwd" and len(r) > 4 else r
                for r in rules]

  def tag(tokens: list[str]) -> list[str]:
    # textblob's own Parser.find_tags drops the morphology and context rules; passing them here
    # makes it the full Brill tagger.
    tagged = find_tags(tokens, lexicon=lexicon, morphology=lexicon.morphology,
                       context=context, default=("NN", "NNP", "CD"), language="en")
    return [t for _, t in tagged]

  return tag


def _is_keyword(pre_token: str, penn_tag: str) -> bool:
  return (penn_tag.startswith(KEYWORD_TAGS) and pre_token not in STOP_WORDS
          and _LETTERS.fullmatch(pre_token) is not None)


@functools.lru_cache(maxsize=1 << 18)
def _analyse(text: str) -> tuple[tuple[str, ...], tuple[bool, ...]]:
  """(pre-tokens of the cleaned text, keyword flag of each); cached per caption."""
  pre_tokens = tuple(_PRE_TOKEN.findall(_clean(text)))
  if not pre_tokens:
    return (), ()
  tags = _tagger()(list(pre_tokens))
  return pre_tokens, tuple(_is_keyword(w, t) for w, t in zip(pre_tokens, tags))


def _check_texts(texts: str | Sequence[str], caller: str) -> list[str]:
  if isinstance(texts, str):
    texts = [texts]
  texts = list(texts)
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(f"{caller}: texts[{i}] is {type(text).__name__}, not str: {text!r:.80}")
  return texts


def keyword_words(texts: str | Sequence[str]) -> list[list[tuple[str, bool]]]:
  """Each text's CLIP pre-tokens (cleaned, lower-cased) with their keyword flag.

  The word-level view of `keyword_mask`, for inspection and tests: "a man's hat" ->
  [("a", False), ("man", True), ("'s", False), ("hat", True)].
  """
  out = []
  for text in _check_texts(texts, "keyword_words"):
    pre_tokens, flags = _analyse(text)
    out.append(list(zip(pre_tokens, flags)))
  return out


def keyword_mask(texts: str | Sequence[str], context_length: int) -> np.ndarray:
  """Marks the BPE tokens of keywords, aligned with `tokenize(texts, context_length)`.

  Args:
    texts: captions (one string or a sequence of strings), raw as given to `tokenize`.
    context_length: L, columns of the result (the `context_length` of the matching `tokenize`).

  Returns:
    int32 [N, L]: 1 on every BPE token of a keyword word (all its pieces), 0 on start/end tokens,
    padding, stop words, punctuation, digits and other parts of speech. Pieces that `tokenize`
    cuts off (text longer than L - 2 tokens) are cut off here too.

  Raises:
    TypeError / ValueError: a text that is not a str, or a bad `context_length`.
  """
  if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
    raise TypeError(f"keyword_mask: context_length must be an int, got {context_length!r}")
  if context_length < 2:
    raise ValueError(f"keyword_mask: context_length must be at least 2 (start and end tokens), "
                     f"got {context_length}")
  texts = _check_texts(texts, "keyword_mask")
  out = np.zeros((len(texts), context_length), np.int32)
  last = context_length - 1  # columns 1 .. L-2 hold BPE tokens; L-1 is at most the end token
  for row, text in enumerate(texts):
    pre_tokens, flags = _analyse(text)
    col = 1
    for word, flag in zip(pre_tokens, flags):
      if col >= last:
        break
      n = _num_pieces(word)
      if flag:
        out[row, col:min(col + n, last)] = 1
      col += n
  return out
