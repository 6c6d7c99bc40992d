r"""Keyword-mask throughput: captions/s of `tvr_jax.keywords.keyword_mask` beside `tokenize`.

    python -m benchmarks.keywords            # ~15 s on 2 cores
    python -m benchmarks.keywords --quick    # a few seconds (smoke test)

Captions: the hand-labelled MSR-VTT / MSVD-style set of the tests (tests/data/keyword_captions.txt,
~330 distinct captions of ~7 words). Rows (median of --repeats calls over all of them, one untimed
call first, one core):
  - tokenize: the BPE ids alone, for scale;
  - keyword_mask, cold: both caches cleared before each call (tagging + BPE piece counts);
  - keyword_mask, new captions: caption cache cleared, pre-token cache warm, i.e. a first epoch
    once the dataset's vocabulary has been seen (the usual case in training);
  - keyword_mask, cached: every caption seen before (later epochs in the same worker).
The tagger's one-off load (textblob import and its lexicon) is reported on its own.
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks import common
from tvr_jax import keywords
from tvr_jax.tokenizer import tokenize

_CAPTIONS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                         "data", "keyword_captions.txt")


def _captions() -> list[str]:
  """The distinct captions of the hand-labelled set, keyword marks removed."""
  with open(_CAPTIONS, encoding="utf-8") as f:
    lines = [line.strip().replace("*", "") for line in f
             if line.strip() and not line.startswith("#")]
  return list(dict.fromkeys(lines))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--context-length", type=int, default=32)
  parser.add_argument("--quick", action="store_true", help="2 repeats")
  args = parser.parse_args(argv)
  if args.quick:
    args.repeats = 2
  texts = _captions()
  length = args.context_length
  tokenize(texts[:1], length)  # vocabulary load, not timed
  t0 = time.perf_counter()
  keywords.keyword_mask(texts[:1], length)
  load_s = time.perf_counter() - t0

  def cold():
    keywords.clear_caches()
    return keywords.keyword_mask(texts, length)

  def new_captions():
    keywords.clear_caches(pre_tokens=False)
    return keywords.keyword_mask(texts, length)

  rows, rates = [], {}
  for name, fn in [("tokenize", lambda: tokenize(texts, length)),
                   ("keyword_mask, cold", cold),
                   ("keyword_mask, new captions", new_captions),
                   ("keyword_mask, cached", lambda: keywords.keyword_mask(texts, length))]:
    t = common.time_calls(fn, repeats=args.repeats, warmup=1)
    rates[name] = len(texts) / t["median"]
    rows.append((name, f"{t['median'] * 1e3:.1f}", f"{rates[name]:,.0f}"))
  words = sum(len(t.split()) for t in texts) / len(texts)
  print(f"# keyword masks, {len(texts)} distinct captions ({words:.1f} words each), L={length}, "
        f"median of {args.repeats}; {common.cpu_model()}; {common.today()}")
  common.print_table(["what", "ms per call", "captions/s"], rows)
  print(f"tagger load (first call): {load_s:.2f} s")
  new = rates["keyword_mask, new captions"]
  print(f"summary: {new:,.0f} new captions/s per core ({rates['keyword_mask, cold']:,.0f} cold, "
        f"{rates['keyword_mask, cached']:,.0f} cached; tokenize {rates['tokenize']:,.0f}); "
        f"tagger load {load_s:.1f} s")


if __name__ == "__main__":
  main()
