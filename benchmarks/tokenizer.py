r"""CLIP tokenizer throughput: tvr_jax's (on `tokenizers`) beside open_clip's and the old one.

    python -m benchmarks.tokenizer           # 10,000 captions per set, ~2-7 min on 2 cores
    python -m benchmarks.tokenizer --captions 200 --repeats 1 --sets plain

Tokenizers timed, each in a fresh Python process so that "cold" pays its own imports:
- `tvr_jax`: `tvr_jax.tokenizer.CLIPTokenizer`, BPE in Hugging Face `tokenizers` (Rust).
- `hand-written`: the pure-Python BPE that `tvr_jax/tokenizer.py` was before, read from git history
  (`git show OLD_COMMIT:tvr_jax/tokenizer.py`) into a temporary module.
- `open_clip`: `open_clip.tokenizer.SimpleTokenizer` (the reference; imports torch).
- `transformers`: transformers' `CLIPTokenizer` (v5's name for the fast, `tokenizers`-backed class;
  `CLIPTokenizerFast` is an alias) built in memory from the same vocabulary, fed text cleaned by
  `tvr_jax.tokenizer.clean_text` (imported before its import is timed, so `tokenizers` is already
  loaded there). It pads with EOT; its rows are compared after zeroing what follows the first EOT.

Two caption sets: "plain" (MSR-VTT-like English, 3 in 10 with a random rare word) and "messy"
(non-ASCII scripts, HTML entities, mojibake, emoji, curly quotes). Per tokenizer and set: import
seconds, construction seconds, the first call on all captions (empty word caches), cold captions/s =
N / (construction + first call), warm captions/s = N / median of `--repeats` further calls, the
same per second of process CPU time (all threads; steadier than wall time on a shared machine), and
whether every row equals open_clip's. The CPU model and load average are printed beside the figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import common

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The last commit whose tvr_jax/tokenizer.py is the hand-written BPE.
OLD_COMMIT = "f514d898495d3618bca1aaeaedf07228431b27ca"
IMPLEMENTATIONS = ("tvr_jax", "hand-written", "open_clip", "transformers")
SETS = ("plain", "messy")

_SUBJECTS = ["a man", "a woman", "a girl", "a boy", "two people", "a dog", "a cat", "a chef",
             "a reporter", "a group of kids", "the band", "a player", "someone", "an old man"]
_VERBS = ["is playing", "is cooking", "talks about", "is dancing with", "is driving", "shows",
          "is running on", "is singing", "explains", "is riding", "is swimming in", "watches"]
_OBJECTS = ["a guitar", "the piano", "pasta", "the weather", "a red car", "the beach", "a horse",
            "a song", "the news", "a basketball game", "a pool", "a video game", "the kitchen"]
_PLACES = ["", " on stage", " in the kitchen", " outside", " at night", " in a park", " on tv",
           " in the rain", " with friends", " for the camera"]
_MESSY = ["naïve café", "über straße", "日本語のテキスト", "中文字幕", "한국어 문장",
          "русский текст", "ελληνικά", "العربية", "हिन्दी", "&amp;", "&lt;b&gt;", "&#39;", "&quot;",
          "cafÃ©", "donâ€™t", "“quoted”", "‘single’", "😀", "👍🏽", "🇯🇵", "❤️", "½",
          "Ｆｕｌｌ", "ﬁne", "dog", "runs", "the", "a", "42", "!", "...", "—"]


def _rare_word(rng: random.Random) -> str:
  return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 12)))


def captions(kind: str, n: int, seed: int = 0) -> list[str]:
  """`n` reproducible captions of set `kind` ("plain" or "messy")."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    if kind == "plain":
      text = (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
              f"{rng.choice(_PLACES)}")
      if rng.random() < 0.3:
        text = text.replace(" a ", f" a {_rare_word(rng)} ", 1)
      text = (text[0].upper() + text[1:] + rng.choice(["", ".", " ."]))
    elif kind == "messy":
      text = " ".join(rng.choice(_MESSY) if rng.random() < 0.9 else _rare_word(rng)
                      for _ in range(rng.randint(3, 25)))
    else:
      raise ValueError(f"unknown caption set {kind!r}; expected one of {SETS}")
    out.append(text)
  return out


def _load_old_module(tmp: str):
  """Imports the hand-written tokenizer of OLD_COMMIT from a temporary file."""
  try:
    source = subprocess.run(["git", "-C", REPO_ROOT, "show", f"{OLD_COMMIT}:tvr_jax/tokenizer.py"],
                            capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    detail = getattr(e, "stderr", "") or e
    raise RuntimeError(f"cannot read tvr_jax/tokenizer.py at {OLD_COMMIT[:7]} from git in "
                       f"{REPO_ROOT}: {detail}") from e
  path = os.path.join(tmp, "handwritten_clip_tokenizer.py")
  with open(path, "w") as f:
    f.write(source)
  spec = importlib.util.spec_from_file_location("handwritten_clip_tokenizer", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _child(impl: str, kind: str, n: int, context_length: int, repeats: int, vocab: str,
           out_path: str) -> dict:
  """Times one tokenizer on one set in this (fresh) process; writes its ids to `out_path`."""
  texts = captions(kind, n)
  with tempfile.TemporaryDirectory() as tmp:
    if impl == "transformers":
      # Untimed: the cleaning and file reading shared with tvr_jax (reading is timed below).
      from tvr_jax.tokenizer import clean_text, load_vocabulary
    t0 = time.perf_counter()
    if impl == "tvr_jax":
      from tvr_jax import tokenizer as lib
      import tokenizers
      version = f"tokenizers {tokenizers.__version__}"
    elif impl == "hand-written":
      lib = _load_old_module(tmp)
      version = f"git {OLD_COMMIT[:7]}"
    elif impl == "open_clip":
      from benchmarks.torch_reference import import_open_clip
      lib = import_open_clip()
      version = f"open_clip {lib.__version__}"
    elif impl == "transformers":
      import transformers
      from transformers import CLIPTokenizer as HFCLIPTokenizer
      version = f"transformers {transformers.__version__}"
    else:
      raise ValueError(f"unknown tokenizer {impl!r}; expected one of {IMPLEMENTATIONS}")
    t1 = time.perf_counter()
    if impl == "tvr_jax":
      tok = lib.CLIPTokenizer(vocab)
      call = lambda: tok(texts, context_length=context_length)  # noqa: E731
    elif impl == "hand-written":
      tok = lib.CLIPTokenizer(vocab)
      call = lambda: tok(texts, context_length=context_length)  # noqa: E731
    elif impl == "open_clip":
      tok = lib.tokenizer.SimpleTokenizer(vocab, context_length=context_length)
      call = lambda: tok(texts, context_length=context_length).numpy()  # noqa: E731
    else:
      tokens, merges = load_vocabulary(vocab)
      tokens = tokens[:-2] + ["<|startoftext|>", "<|endoftext|>"]  # transformers' spelling
      tok = HFCLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)

      def call():
        ids = tok([clean_text(t) for t in texts], padding="max_length", truncation=True,
                  max_length=context_length, return_tensors="np")["input_ids"]
        after_eot = np.cumsum(ids == 49407, axis=1) - (ids == 49407) > 0
        return np.where(after_eot, 0, ids)
    t2 = time.perf_counter()
    ids = call()
    t3 = time.perf_counter()
    wall, cpu = [], []
    for _ in range(repeats):
      w, c = time.perf_counter(), time.process_time()
      call()
      wall.append(time.perf_counter() - w)
      cpu.append(time.process_time() - c)
  np.save(out_path, np.asarray(ids, np.int32))
  return {"impl": impl, "version": version, "set": kind, "import_s": t1 - t0,
          "construct_s": t2 - t1, "first_s": t3 - t2, "warm_s": float(np.median(wall)),
          "warm_cpu_s": float(np.median(cpu))}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--captions", type=int, default=10_000, help="captions per set")
  p.add_argument("--context_length", type=int, default=77)
  p.add_argument("--repeats", type=int, default=3, help="warm calls; the median is reported")
  p.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {SETS}")
  p.add_argument("--tokenizers", default=",".join(IMPLEMENTATIONS),
                 help=f"comma-separated, of {IMPLEMENTATIONS} (open_clip is always run)")
  p.add_argument("--child", nargs=3, metavar=("IMPL", "SET", "OUT"), help=argparse.SUPPRESS)
  p.add_argument("--vocab", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    impl, kind, out = args.child
    print(json.dumps(_child(impl, kind, args.captions, args.context_length, args.repeats,
                            args.vocab, out)))
    return

  sets = [s for s in args.sets.split(",") if s]
  impls = [i for i in args.tokenizers.split(",") if i]
  for name, given, allowed in (("--sets", sets, SETS), ("--tokenizers", impls, IMPLEMENTATIONS)):
    unknown = sorted(set(given) - set(allowed))
    if unknown or not given:
      p.error(f"{name}: unknown or empty {unknown or given}; expected some of {allowed}")
  if "open_clip" not in impls:
    impls.append("open_clip")  # the reference every row is compared with
  from tvr_jax.tokenizer import default_vocab_path
  vocab = default_vocab_path()
  print(f"CLIP tokenizer throughput, {common.today()}")
  print(f"CPU: {common.cpu_model()}; load average {os.getloadavg()[0]:.1f} at start")
  print(f"{args.captions:,} captions per set, context length {args.context_length}; cold = "
        f"construction + first call (imports apart); warm = median of {args.repeats} more calls")
  rows, results = [], {}
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  with tempfile.TemporaryDirectory() as tmp:
    for kind in sets:
      ids = {}
      for impl in impls:
        out = os.path.join(tmp, f"{impl}-{kind}.npy")
        cmd = [sys.executable, "-m", "benchmarks.tokenizer", "--child", impl, kind, out,
               "--vocab", vocab, "--captions", str(args.captions),
               "--context_length", str(args.context_length), "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
        if proc.returncode != 0:
          raise RuntimeError(f"{impl} on {kind} failed (rc={proc.returncode}):\n"
                             f"{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results[(impl, kind)] = r
        ids[impl] = np.load(out)
      for impl in impls:
        r = results[(impl, kind)]
        same = int((ids[impl] == ids["open_clip"]).all(axis=1).sum())
        n = args.captions
        rows.append([kind, f"{impl} ({r['version']})", f"{r['import_s']:.2f}",
                     f"{r['construct_s']:.2f}", f"{r['first_s']:.2f}",
                     f"{n / (r['construct_s'] + r['first_s']):,.0f}", f"{n / r['warm_s']:,.0f}",
                     f"{n / r['warm_cpu_s']:,.0f}",
                     "yes" if same == n else f"NO ({n - same} rows differ)"])
  print()
  common.print_table(["set", "tokenizer", "import s", "build s", "first call s", "cold captions/s",
                      "warm captions/s", "warm captions/CPU-s", "ids = open_clip"], rows)
  parts = []
  for kind in sets:
    rates = ", ".join(f"{impl} {args.captions / results[(impl, kind)]['warm_s']:,.0f}"
                      for impl in impls)
    parts.append(f"{kind} warm captions/s: {rates}")
  print(f"summary: {'; '.join(parts)}; load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
  main()
