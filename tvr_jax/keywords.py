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
downloaded; the tags are Penn Treebank tags (NN*, JJ*, VB* are keywords). The contextual rules are
applied by `_IndexedContext` (textblob's result, faster), with one broken rule repaired
(`context_rules`).

Alignment uses only the public `tokenize`: the text is cleaned and split into CLIP's pre-tokens
(the tokenizer's word regex), and each pre-token's BPE piece count is `tokenize([pre_token])`
minus start/end (cached per pre-token), so the pieces of consecutive pre-tokens fill consecutive
columns after the start token, truncated where `tokenize` truncates. Each caption's result is
cached too (one byte per BPE token), so later epochs cost a lookup. Choice of tagger, accuracy and
speed: docs/keywords.md.
"""

from __future__ import annotations

import functools
import html
from typing import Sequence

import ftfy
import numpy as np
import regex

from tvr_jax.tokenizer import tokenize

__all__ = ["KEYWORD_TAGS", "STOP_WORDS", "clear_caches", "keyword_mask", "keyword_words"]

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


# Brill's contextual-rule conditions exactly as textblob's `Context.apply` tests them: `w` / `t`
# are the words / current tags padded with three "STAART" on each side, `i` the position, `x` / `y`
# the rule's arguments. (textblob lists "next1or2or3wd" / "prev1or2or3wd" but never tests them.)
_CONDITIONS = {
    "prevtag": lambda w, t, i, x, y: x == t[i - 1],
    "nexttag": lambda w, t, i, x, y: x == t[i + 1],
    "prev2tag": lambda w, t, i, x, y: x == t[i - 2],
    "next2tag": lambda w, t, i, x, y: x == t[i + 2],
    "prev1or2tag": lambda w, t, i, x, y: x in (t[i - 1], t[i - 2]),
    "next1or2tag": lambda w, t, i, x, y: x in (t[i + 1], t[i + 2]),
    "prev1or2or3tag": lambda w, t, i, x, y: x in (t[i - 1], t[i - 2], t[i - 3]),
    "next1or2or3tag": lambda w, t, i, x, y: x in (t[i + 1], t[i + 2], t[i + 3]),
    "surroundtag": lambda w, t, i, x, y: x == t[i - 1] and y == t[i + 1],
    "curwd": lambda w, t, i, x, y: x == w[i],
    "prevwd": lambda w, t, i, x, y: x == w[i - 1],
    "nextwd": lambda w, t, i, x, y: x == w[i + 1],
    "prev1or2wd": lambda w, t, i, x, y: x in (w[i - 1], w[i - 2]),
    "next1or2wd": lambda w, t, i, x, y: x in (w[i + 1], w[i + 2]),
    "prevwdtag": lambda w, t, i, x, y: x == w[i - 1] and y == t[i - 1],
    "nextwdtag": lambda w, t, i, x, y: x == w[i + 1] and y == t[i + 1],
    "wdprevtag": lambda w, t, i, x, y: x == t[i - 1] and y == w[i],
    "wdnexttag": lambda w, t, i, x, y: x == w[i] and y == t[i + 1],
    "wdand2aft": lambda w, t, i, x, y: x == w[i] and y == w[i + 2],
    "wdand2tagbfr": lambda w, t, i, x, y: x == t[i - 2] and y == w[i],
    "wdand2tagaft": lambda w, t, i, x, y: x == w[i] and y == t[i + 2],
    "lbigram": lambda w, t, i, x, y: x == w[i - 1] and y == w[i],
    "rbigram": lambda w, t, i, x, y: x == w[i] and y == w[i + 1],
    "prevbigram": lambda w, t, i, x, y: x == t[i - 2] and y == t[i - 1],
    "nextbigram": lambda w, t, i, x, y: x == t[i + 1] and y == t[i + 2],
}
_PAD = "STAART"


def context_rules() -> list[list[str]]:
  """TextBlob's English contextual rules (`[from, to, command, x(, y)]`), with one repair.

  One shipped rule, "NN PRP PREVWD are mine", gives PREVWD (one argument) two: applied as written
  it retags EVERY noun after "are" as a pronoun ("people are dancing" -> dancing/PRP). Its evident
  meaning is the word bigram "are mine", i.e. LBIGRAM (previous word, this word).
  """
  from textblob import en as textblob_en
  from textblob._text import Context
  rules = list(Context(textblob_en.lexicon, path=textblob_en.lexicon.context.path))
  return [r[:2] + ["LBIGRAM"] + r[3:] if r[2].lower() == "prevwd" and len(r) > 4 else list(r)
          for r in rules]


class _IndexedContext:
  """Applies Brill contextual rules with the result of textblob's `Context.apply`, ~10x faster.

  `Context.apply` tries every rule (~290) at every token. A rule can only fire on a token whose
  tag before the contextual pass is the rule's first field (or "*"), so trying just those rules,
  in file order, at each position gives the same tags; tests/keywords_test.py checks this against
  `Context.apply` itself.
  """

  def __init__(self, rules: Sequence[Sequence[str]]):
    # (from tag, condition, x, y, to tag) in file order; a command that Context.apply never tests
    # is left out (the rule never fires there either).
    self._rules = [(r[0], _CONDITIONS[r[2].lower()], r[3], r[4] if len(r) > 4 else "", r[1])
                   for r in rules if r[2].lower() in _CONDITIONS]
    self._by_tag: dict[str, list] = {}

  def _for_tag(self, tag: str) -> list:
    """The rules that can fire on a token tagged `tag`, in file order (built once per tag)."""
    rules = self._by_tag.get(tag)
    if rules is None:
      rules = [e for e in self._rules if e[0] == tag or e[0] == "*"]
      self._by_tag[tag] = rules
    return rules

  def apply(self, tagged: list[list[str]]) -> list[list[str]]:
    """[[word, tag], ...] -> the same words with their tags after the contextual rules."""
    words = [_PAD] * 3 + [w for w, _ in tagged] + [_PAD] * 3
    tags = [_PAD] * 3 + [t for _, t in tagged] + [_PAD] * 3
    for i in range(3, len(tags) - 3):
      # Context.apply matches each rule's first field against the token's tag from before this
      # position's rules ran, so later rules do not see earlier rules' changes here.
      for _, condition, x, y, new in self._for_tag(tags[i]):
        if condition(words, tags, i, x, y):
          tags[i] = new
    return [[w, t] for w, t in zip(words[3:-3], tags[3:-3])]


@functools.lru_cache(maxsize=1)
def _tagger():
  """TextBlob's Brill tagger with its lexical and contextual rules: tokens -> Penn tags."""
  try:
    from textblob import en as textblob_en
    from textblob._text import find_tags
  except ImportError as e:  # not installed, or a version without the pattern tagger
    raise ImportError("keyword masks need textblob (pip install textblob==0.20.1): "
                      f"{e}") from e
  lexicon = textblob_en.lexicon
  context = _IndexedContext(context_rules())

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


def _analyse(text: str) -> tuple[tuple[str, ...], tuple[bool, ...]]:
  """(pre-tokens of the cleaned text, keyword flag of each)."""
  pre_tokens = tuple(_PRE_TOKEN.findall(_clean(text)))
  if not pre_tokens:
    return (), ()
  tags = _tagger()(list(pre_tokens))
  return pre_tokens, tuple(_is_keyword(w, t) for w, t in zip(pre_tokens, tags))


@functools.lru_cache(maxsize=1 << 18)
def _token_flags(text: str) -> bytes:
  """One byte (0/1) per BPE token of the whole text (no start/end, untruncated); cached per caption.

  Bytes keep the cache small (~290 B for a 15-word caption with the cache's overhead: at most
  ~50 MB per process for MSR-VTT's 180k training captions).
  """
  pre_tokens, flags = _analyse(text)
  return b"".join((b"\x01" if flag else b"\x00") * _num_pieces(w)
                  for w, flag in zip(pre_tokens, flags))


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
  width = context_length - 2  # columns 1 .. L-2 hold BPE tokens; tokenize cuts the rest
  for row, text in enumerate(texts):
    flags = _token_flags(text)
    n = min(len(flags), width)
    out[row, 1:n + 1] = np.frombuffer(flags, np.uint8, count=n)
  return out


def clear_caches(captions: bool = True, pre_tokens: bool = True) -> None:
  """Empties the per-caption and/or per-pre-token caches (benchmarks time uncached work)."""
  if captions:
    _token_flags.cache_clear()
  if pre_tokens:
    _num_pieces.cache_clear()
