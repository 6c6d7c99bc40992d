r"""The paper's component ablation as one command: CLIP4Clip baseline -> DMAE -> NegNCE -> TPM-CL.

  python -m benchmarks.ablation --quick --out runs/ablation          # synthetic set, this CPU
  python -m benchmarks.ablation --config=configs/msrvtt.py --out runs/ablation_msrvtt \
      --set init_from=checkpoints/ViT-B-32                           # a real set, pretrained CLIP

Rows (each one the previous row plus one switch, except the last two, which branch off TPM-CL 4):

  CLIP4Clip baseline      meanP: cos(sentence, normalised mean frame), InfoNCE (pooled_video)
  DMAE sentence-only      token-wise sentence-frame interaction, no attention, InfoNCE
  + textual attention     + word branch (textual_attention)
  + visual attention      + frame-to-frame term (visual_attention)
  + NegNCE                contrastive_loss = negnce
  + TPM-CL type 2/3/4     partial_type 2 (T1+T2), 3 (T3), 4 (T1+T2+T3), each on "+ NegNCE"
  + keyword weighting     type 4 + keyword_weighting
  seqTransf               type 4 + header seqTransf

Every cell (row x seed) is a normal training run (`tvr_jax.train.train_and_evaluate`) in its own
directory OUT/<row>/seed<k>/, ending in `cell.json`; a re-run skips cells that have one and resumes
the others from their checkpoints. The table gives, per row, mean ± std over seeds of t2v and v2t
R@1, R@5, MdR, and the paired difference of R@1 from the baseline (same seeds, same queries) with
a 95% bootstrap interval that resamples seeds and queries. On the synthetic set it adds what each
component reads: direction-twin accuracy (does a caption score its own clip above the clip that
differs only in direction; chance 50%), static R@1 (the top-1 clip has every static attribute
right, direction ignored; a direction-blind model at best gets R@1 = 40.6% with static R@1 = 100%),
and the share of top-1 errors per attribute (which attribute the confusions get wrong).

`--quick`: configs/synthetic.py, 3 seeds, QUICK_STEPS optimizer steps per cell instead of the
default run's 480 (the grid of 30 cells must fit in 45 minutes on a 2-core CPU), no DSL rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib
import json
import os
import sys
import time

import numpy as np

from benchmarks import common

QUICK_STEPS = 160
QUICK_CONFIG = "configs/synthetic.py"
BOOTSTRAP_REPS = 2000
STATIC_ATTRIBUTES = ("shape", "colour", "size", "background")
ATTRIBUTES = STATIC_ATTRIBUTES + ("direction",)

# The model switches every row sets explicitly (everything else stays as the config has it).
SWITCHES = ("header", "pooled_video", "textual_attention", "visual_attention", "contrastive_loss",
            "partial_type", "keyword_weighting")
BASELINE = dict(header="meanP", pooled_video=True, textual_attention=False,
                visual_attention=False, contrastive_loss="infonce", partial_type=0,
                keyword_weighting=False)


@dataclasses.dataclass(frozen=True)
class Row:
  """One grid row: a display name, a directory name and the full set of model switches."""
  name: str
  slug: str
  switches: dict


def _rows() -> tuple[Row, ...]:
  rows, cur = [], dict(BASELINE)

  def add(name, slug, base=None, **change):
    sw = dict(base if base is not None else cur, **change)
    rows.append(Row(name, slug, sw))
    return sw

  cur = add("CLIP4Clip baseline", "baseline")
  cur = add("DMAE sentence-only", "dmae_sentence", pooled_video=False)
  cur = add("+ textual attention", "textual", textual_attention=True)
  cur = add("+ visual attention", "visual", visual_attention=True)
  negnce = cur = add("+ NegNCE", "negnce", contrastive_loss="negnce")
  add("+ TPM-CL type 2", "tpm2", negnce, partial_type=2)
  add("+ TPM-CL type 3", "tpm3", negnce, partial_type=3)
  full = add("+ TPM-CL type 4", "tpm4", negnce, partial_type=4)
  add("+ keyword weighting", "keywords", full, keyword_weighting=True)
  add("seqTransf", "seqtransf", full, header="seqTransf")
  return tuple(rows)


ROWS = _rows()


# ==================================================================================================
# Configs
# ==================================================================================================
def load_config(spec: str):
  """`configs/x.py[:arg]` -> its get_config(arg)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config={spec!r}: no file {path!r}")
  module = os.path.splitext(os.path.relpath(path))[0].replace(os.sep, ".")
  return importlib.import_module(module).get_config(arg)


def _parse_value(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def apply_sets(config, sets) -> None:
  """`key.sub=value` overrides (JSON values, else strings); unknown keys fail (locked config)."""
  for item in sets:
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"--set {item!r}: expected key=value")
    *parents, leaf = key.split(".")
    target = config
    for k in parents:
      target = target[k]
    target[leaf] = _parse_value(value)


def cell_config(base_config, row: Row, seed: int, *, quick: bool):
  """The run config of one cell: the base config, the row's switches, the seed, quiet reporting."""
  c = base_config.copy_and_resolve_references()
  for k in SWITCHES:
    c.model[k] = row.switches[k]
  c.seed = seed
  c.eval_save_scores = True
  c.progress_bar = False
  c.eval_every = 0
  c.keep_checkpoints = 1
  if quick:
    c.num_train_steps = QUICK_STEPS
    c.dsl = False
    c.log_every = 16
    c.checkpoint_every = 80     # resumable mid-cell without paying for many saves
  return c


# ==================================================================================================
# Per-query analysis of one cell's score matrix.
# ==================================================================================================
def synthetic_attributes(config, path: str = "") -> dict[str, dict] | None:
  """video_id -> attributes of the synthetic set (None for other datasets or a missing file).

  `path`: the raw tree's annotations.json; default the one the builder renders into
  DATA_DIR/downloads/manual/.
  """
  if config.dataset != "synthetic":
    return None
  path = path or os.path.join(config.data_dir, "downloads", "manual", "annotations.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return {v["video_id"]: v["attributes"] for v in json.load(f)["videos"]}


def analyse_scores(sim: np.ndarray, caption_video: np.ndarray, video_ids,
                   attributes: dict | None) -> dict:
  """Metrics, per-query hits and (synthetic) phenomenon measures of one score matrix.

  Args:
    sim: [Nt, Nv] caption x video scores; caption_video: [Nt] video index of each caption;
    video_ids: [Nv] dataset ids; attributes: video_id -> attribute dict, or None.

  Returns:
    JSON-able dict: `metrics` (R@1/5/10, MdR, MnR both ways), `hits` {"t2v": [Nt] 0/1, "v2t":
    [Nv] 0/1} (R@1 per query), and with attributes `phenomena` (percentages).
  """
  from tvr_jax import metrics as metrics_lib
  metrics = metrics_lib.retrieval_metrics(sim, caption_video)
  t2v_rank = metrics_lib.retrieval_ranks(sim, caption_video)
  group = metrics_lib.caption_group_similarity(sim, caption_video)     # [Nv, Nv]
  v2t_rank = metrics_lib.retrieval_ranks(group)
  out = {"metrics": {k: float(v) for k, v in metrics.items()},
         "hits": {"t2v": (t2v_rank == 0).astype(int).tolist(),
                  "v2t": (v2t_rank == 0).astype(int).tolist()}}
  if attributes is None:
    return out
  attrs = [attributes[str(v)] for v in video_ids]
  static = [tuple(a[k] for k in STATIC_ATTRIBUTES) for a in attrs]
  twin = np.full(len(attrs), -1)
  by_static: dict[tuple, list[int]] = {}
  for i, key in enumerate(static):
    by_static.setdefault(key, []).append(i)
  opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
  for members in by_static.values():
    for i in members:
      for j in members:
        if attrs[j]["direction"] == opposite.get(attrs[i]["direction"]):
          twin[i] = j
  rows = np.arange(len(caption_video))
  own = sim[rows, caption_video]
  has_twin = twin[caption_video] >= 0
  twin_t2v = own[has_twin] > sim[rows[has_twin], twin[caption_video[has_twin]]]
  v_has = twin >= 0
  vids = np.arange(len(attrs))
  twin_v2t = group[vids[v_has], vids[v_has]] > group[vids[v_has], twin[v_has]]
  top1 = np.argmax(sim, axis=1)
  wrong = top1 != caption_video
  static_hit = np.array([static[t] == static[v] for t, v in zip(top1, caption_video)])
  errors = {}
  for k in ATTRIBUTES:
    differs = np.array([attrs[t][k] != attrs[v][k] for t, v in zip(top1, caption_video)])
    errors[k] = float(100 * differs[wrong].mean()) if wrong.any() else 0.0
  out["phenomena"] = {"twin_t2v": float(100 * twin_t2v.mean()),
                      "twin_v2t": float(100 * twin_v2t.mean()),
                      "static_r1": float(100 * static_hit.mean()),
                      "error_attribute": errors}
  return out


def static_ceiling(video_ids, attributes: dict) -> float:
  """Best expected R@1 (%) of a model that reads every static attribute and no motion."""
  counts: dict[tuple, int] = {}
  keys = [tuple(attributes[str(v)][k] for k in STATIC_ATTRIBUTES) for v in video_ids]
  for key in keys:
    counts[key] = counts.get(key, 0) + 1
  return float(100 * np.mean([1.0 / counts[k] for k in keys]))


# ==================================================================================================
# Running cells.
# ==================================================================================================
def latest_scores(workdir: str) -> str | None:
  files = glob.glob(os.path.join(workdir, "scores_step_*.npz"))
  return max(files, key=lambda p: int(p.rsplit("_", 1)[1][:-4])) if files else None


def run_cell(config, workdir: str, attributes) -> dict:
  """Trains and evaluates one cell (resuming from its checkpoints) and writes its cell.json."""
  from tvr_jax import train
  done = os.path.join(workdir, "cell.json")
  t0 = time.perf_counter()
  train.train_and_evaluate(config, workdir)
  path = latest_scores(workdir)
  if path is None:
    raise RuntimeError(f"{workdir}: training finished without scores_step_*.npz")
  with np.load(path) as z:
    sim, cv, ids = z["sim"], z["caption_to_video"], z["video_ids"]
  result = analyse_scores(sim, cv, [str(v) for v in ids], attributes)
  result.update(seconds=round(time.perf_counter() - t0, 1), scores=os.path.basename(path),
                seed=int(config.seed), switches={k: config.model[k] for k in SWITCHES})
  if attributes is not None:
    result["static_ceiling"] = static_ceiling([str(v) for v in ids], attributes)
  with open(done + ".tmp", "w") as f:
    json.dump(result, f)
  os.replace(done + ".tmp", done)
  return result


def load_cell(workdir: str) -> dict | None:
  path = os.path.join(workdir, "cell.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


# ==================================================================================================
# Table.
# ==================================================================================================
def paired_bootstrap(hits_row: np.ndarray, hits_base: np.ndarray, reps: int = BOOTSTRAP_REPS,
                     seed: int = 0) -> tuple[float, float, float]:
  """Mean difference (points) of R@1 hits [S, Q], 95% interval resampling seeds and queries."""
  diff = 100.0 * (np.asarray(hits_row, float) - np.asarray(hits_base, float))
  s, q = diff.shape
  rng = np.random.default_rng(seed)
  stats = np.empty(reps)
  for r in range(reps):
    rows = rng.integers(0, s, s)
    cols = rng.integers(0, q, q)
    stats[r] = diff[rows][:, cols].mean()
  lo, hi = np.percentile(stats, [2.5, 97.5])
  return float(diff.mean()), float(lo), float(hi)


def _ms(values, digits: int = 1) -> str:
  v = np.asarray(values, float)
  if len(v) == 1:
    return f"{v[0]:.{digits}f}"
  return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def table(cells: dict[str, list[dict]]) -> str:
  """Markdown table of the rows that have cells; paired differences use seeds both rows have."""
  lines = []
  have_phen = any("phenomena" in c for cs in cells.values() for c in cs)
  head = ["row", "seeds", "t2v R@1", "t2v R@5", "t2v MdR", "v2t R@1", "v2t R@5", "v2t MdR",
          "Δ t2v R@1 [95% CI]", "Δ v2t R@1 [95% CI]"]
  if have_phen:
    head += ["twin t2v %", "twin v2t %", "static R@1", "errors: shape/colour/size/bg/dir %"]
  lines.append("| " + " | ".join(head) + " |")
  lines.append("|" + "---|" * len(head))
  base = {c["seed"]: c for c in cells.get("baseline", [])}
  for row in ROWS:
    cs = sorted(cells.get(row.slug, []), key=lambda c: c["seed"])
    if not cs:
      continue
    m = lambda key, cs=cs: [c["metrics"][key] for c in cs]  # noqa: E731
    out = [row.name, str(len(cs)), _ms(m("t2v/R@1")), _ms(m("t2v/R@5")), _ms(m("t2v/MdR")),
           _ms(m("v2t/R@1")), _ms(m("v2t/R@5")), _ms(m("v2t/MdR"))]
    paired = [c for c in cs if c["seed"] in base]
    for d in ("t2v", "v2t"):
      if row.slug == "baseline" or not paired:
        out.append("—")
        continue
      mean, lo, hi = paired_bootstrap([c["hits"][d] for c in paired],
                                      [base[c["seed"]]["hits"][d] for c in paired])
      out.append(f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]")
    if have_phen:
      p = lambda key, cs=cs: [c["phenomena"][key] for c in cs]  # noqa: E731
      errs = "/".join(f"{np.mean([c['phenomena']['error_attribute'][k] for c in cs]):.0f}"
                      for k in ATTRIBUTES)
      out += [_ms(p("twin_t2v")), _ms(p("twin_v2t")), _ms(p("static_r1")), errs]
    lines.append("| " + " | ".join(out) + " |")
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help=f"synthetic set, {QUICK_STEPS} steps per cell (fits 45 min on a 2-core CPU)")
  p.add_argument("--config", default=QUICK_CONFIG, help="run config file[:arg] (default synthetic)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, repeatable (e.g. init_from=checkpoints/ViT-B-32)")
  p.add_argument("--out", required=True, help="one run directory per cell: OUT/<row>/seed<k>/")
  p.add_argument("--annotations", default="",
                 help="synthetic set: its raw annotations.json "
                      "(default DATA_DIR/downloads/manual/)")
  p.add_argument("--seeds", type=int, default=3, help="seeds per row (>= 3 for the table)")
  p.add_argument("--table_only", action="store_true",
                 help="print the table of the cells finished so far; train nothing")
  p.add_argument("--rows", default="", help="comma-separated row slugs (default: all) — "
                 + ", ".join(r.slug for r in ROWS))
  return p.parse_args(argv)


def main(argv=None) -> str:
  args = parse_args(argv)
  if args.quick and args.config != QUICK_CONFIG:
    raise SystemExit("--quick runs configs/synthetic.py; drop --config or --quick")
  rows = ROWS
  if args.rows:
    wanted = args.rows.split(",")
    unknown = set(wanted) - {r.slug for r in ROWS}
    if unknown:
      raise SystemExit(f"--rows: unknown row(s) {sorted(unknown)}; known: {[r.slug for r in ROWS]}")
    rows = tuple(r for r in ROWS if r.slug in wanted)
  import jax
  # Cells of one row differ only in the seed: with a persistent cache their steps compile once.
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(os.path.abspath(args.out), "jit_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  base_config = load_config(args.config)
  apply_sets(base_config, args.set)
  attributes = synthetic_attributes(base_config, args.annotations)
  t_start = time.perf_counter()
  cells: dict[str, list[dict]] = {}
  # Seed-major order: after the first pass every row has one seed, so a cut-short grid still has
  # a complete (one-seed) table; within a pass the baseline, the full model and seqTransf first.
  first = ("baseline", "tpm4", "seqtransf")
  order = sorted(rows, key=lambda r: (first.index(r.slug) if r.slug in first else len(first)))
  for seed in range(args.seeds):
    for row in order:
      workdir = os.path.join(os.path.abspath(args.out), row.slug, f"seed{seed}")
      cell = load_cell(workdir)
      if cell is None and args.table_only:
        continue
      if cell is None:
        print(f"[ablation] {row.name}, seed {seed}: training in {workdir}", flush=True)
        cell = run_cell(cell_config(base_config, row, seed, quick=args.quick), workdir, attributes)
        if attributes is None:   # the synthetic attributes may appear once the set was built
          attributes = synthetic_attributes(base_config, args.annotations)
        print(f"[ablation] {row.name}, seed {seed}: t2v R@1 {cell['metrics']['t2v/R@1']:.1f} "
              f"({cell['seconds']:.0f} s)", flush=True)
      else:
        print(f"[ablation] {row.name}, seed {seed}: done before, skipped", flush=True)
      cells.setdefault(row.slug, []).append(cell)
  steps = QUICK_STEPS if args.quick else base_config.num_train_steps
  n_cells = sum(len(cs) for cs in cells.values())
  cell_s = sum(c["seconds"] for cs in cells.values() for c in cs)
  ceiling = next((c["static_ceiling"] for cs in cells.values() for c in cs
                  if "static_ceiling" in c), None)
  text = ("command: python -m benchmarks.ablation "
          f"{' '.join(sys.argv[1:] if argv is None else argv)}\n"
          f"machine: {common.machine()}; date: {common.today()}; "
          f"config {args.config}, {'%d steps' % steps if steps and steps > 0 else 'its epochs'} "
          f"per cell, {args.seeds} seed(s); {n_cells} of {len(rows) * args.seeds} cells finished; "
          f"{cell_s / 60:.0f} min of cell runs; "
          f"wall {time.perf_counter() - t_start:.0f} s this call\n")
  if ceiling is not None:
    text += (f"static ceiling (R@1 of a model reading every static attribute and no motion): "
             f"{ceiling:.1f}%\n")
  text += "\n" + table(cells) + "\n"
  print("\n" + text, flush=True)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(text)
  return text


if __name__ == "__main__":
  main()
