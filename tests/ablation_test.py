"""benchmarks/ablation.py: the grid's row configs, per-query analysis, bootstrap, a smoke run."""

import json
import os

import numpy as np
import pytest

from benchmarks import ablation
from configs import synthetic as synthetic_config
from tvr_jax import metrics as metrics_lib
from tvr_jax.models import build as build_lib

# What each row's name says, written out independently of the script: the full switch set.
BASE = dict(header="meanP", pooled_video=True, textual_attention=False, visual_attention=False,
            contrastive_loss="infonce", partial_type=0, keyword_weighting=False)
DMAE = dict(BASE, pooled_video=False)
FULL_ATT = dict(DMAE, textual_attention=True, visual_attention=True)
NEG = dict(FULL_ATT, contrastive_loss="negnce")
EXPECTED = {
    "CLIP4Clip baseline": BASE,
    "DMAE sentence-only": DMAE,
    "+ textual attention": dict(DMAE, textual_attention=True),
    "+ visual attention": FULL_ATT,
    "+ NegNCE": NEG,
    "+ TPM-CL type 2": dict(NEG, partial_type=2),
    "+ TPM-CL type 3": dict(NEG, partial_type=3),
    "+ TPM-CL type 4": dict(NEG, partial_type=4),
    "+ keyword weighting": dict(NEG, partial_type=4, keyword_weighting=True),
    "seqTransf": dict(NEG, partial_type=4, header="seqTransf"),
}


def test_each_row_config_has_exactly_the_switches_its_name_says():
  assert [r.name for r in ablation.ROWS] == list(EXPECTED)
  assert len({r.slug for r in ablation.ROWS}) == len(ablation.ROWS)
  base = synthetic_config.get_config()
  for row in ablation.ROWS:
    c = ablation.cell_config(base, row, seed=2, quick=True)
    # Every model key other than the row's switches keeps the config's value.
    for key, value in base.model.items():
      want = EXPECTED[row.name].get(key, value)
      assert c.model[key] == want, (row.name, key)
    assert c.seed == 2 and c.num_train_steps == ablation.QUICK_STEPS and c.eval_save_scores
    build_lib.retrieval_config(c)   # the model accepts it


def test_quick_cells_change_only_run_settings_outside_the_model():
  base = synthetic_config.get_config()
  c = ablation.cell_config(base, ablation.ROWS[0], seed=0, quick=True)
  changed = {k for k in base.keys() if k != "model" and c[k] != base[k]}
  assert changed <= {"seed", "eval_save_scores", "progress_bar", "eval_every", "keep_checkpoints",
                     "num_train_steps", "dsl", "log_every", "checkpoint_every"}


def _attributes(n_pairs):
  """Video ids and attributes of `n_pairs` direction twins; pairs 0 and 1 share static ones."""
  ids, attrs = [], {}
  for p in range(n_pairs):
    colour = "red" if p < 2 else f"c{p}"
    size = "small" if p == 0 else "large" if p == 1 else "small"
    for d in ("left", "right"):
      vid = f"v{len(ids)}"
      ids.append(vid)
      attrs[vid] = dict(shape="circle", colour=colour, size=size, background="black",
                        direction=d)
  return ids, attrs


def test_analyse_scores_against_brute_force():
  rng = np.random.default_rng(0)
  ids, attrs = _attributes(4)
  nv = len(ids)
  cv = np.repeat(np.arange(nv), 2)
  sim = rng.normal(size=(len(cv), nv))
  out = ablation.analyse_scores(sim, cv, ids, attrs)
  assert out["metrics"]["t2v/R@1"] == pytest.approx(
      metrics_lib.retrieval_metrics(sim, cv)["t2v/R@1"])
  # Brute force: twin = same static attributes, other direction = the other clip of the pair.
  twin = lambda v: v ^ 1  # noqa: E731
  want_t2v = np.mean([sim[c, cv[c]] > sim[c, twin(cv[c])] for c in range(len(cv))])
  assert out["phenomena"]["twin_t2v"] == pytest.approx(100 * want_t2v)
  group = np.array([[max(sim[c, v] for c in range(len(cv)) if cv[c] == g) for g in range(nv)]
                    for v in range(nv)])
  want_v2t = np.mean([group[v, v] > group[v, twin(v)] for v in range(nv)])
  assert out["phenomena"]["twin_v2t"] == pytest.approx(100 * want_v2t)
  static = lambda v: tuple(attrs[ids[v]][k] for k in ablation.STATIC_ATTRIBUTES)  # noqa: E731
  top1 = sim.argmax(1)
  assert out["phenomena"]["static_r1"] == pytest.approx(
      100 * np.mean([static(t) == static(v) for t, v in zip(top1, cv)]))
  wrong = [(t, v) for t, v in zip(top1, cv) if t != v]
  for k in ablation.ATTRIBUTES:
    want = 100 * np.mean([attrs[ids[t]][k] != attrs[ids[v]][k] for t, v in wrong])
    assert out["phenomena"]["error_attribute"][k] == pytest.approx(want)
  assert out["hits"]["t2v"] == [int(sim[c].argmax() == cv[c]) for c in range(len(cv))]


def test_static_ceiling_counts_indistinguishable_clips():
  ids, attrs = _attributes(3)
  # Pairs 0 and 1 differ in size: every static tuple is shared by exactly 2 clips (the twins).
  assert ablation.static_ceiling(ids, attrs) == pytest.approx(50.0)
  attrs["v2"]["size"] = attrs["v3"]["size"] = "small"   # pair 1 now looks like pair 0
  assert ablation.static_ceiling(ids, attrs) == pytest.approx(100 * (4 * 0.25 + 2 * 0.5) / 6)


def test_paired_bootstrap():
  rng = np.random.default_rng(1)
  base = rng.integers(0, 2, (3, 400))
  mean, lo, hi = ablation.paired_bootstrap(base, base, reps=200)
  assert mean == lo == hi == 0.0
  better = base.copy()
  better[:, :100] = 1   # strictly more hits
  mean, lo, hi = ablation.paired_bootstrap(better, base, reps=500)
  assert mean == pytest.approx(100 * (better - base).mean())
  assert 0 < lo < mean < hi




def test_smoke_run_two_rows_then_rerun_skips(tmp_path, capsys):
  """1 seed, 2 rows, 2 steps each on a 32-clip test split; the re-run trains nothing."""
  from conftest import build_synthetic
  root = str(tmp_path / "synth")
  data_dir = build_synthetic(root, num_train=32, num_val=4, num_test=16)
  out = str(tmp_path / "grid")
  argv = ["--config", "configs/synthetic.py:smoke", "--out", out, "--seeds", "1",
          "--rows", "baseline,negnce",
          "--annotations", os.path.join(root, "raw", "annotations.json"),
          "--set", f"data_dir={data_dir}", "--set", "num_train_steps=2", "--set", "batch_size=8",
          "--set", "eval_max_examples=-1"]
  text = ablation.main(argv)
  for slug in ("baseline", "negnce"):
    cell = json.load(open(os.path.join(out, slug, "seed0", "cell.json")))
    assert cell["switches"] == EXPECTED[{"baseline": "CLIP4Clip baseline",
                                         "negnce": "+ NegNCE"}[slug]]
    assert len(cell["hits"]["t2v"]) == 16 * 3 and len(cell["hits"]["v2t"]) == 16
    assert 0 <= cell["phenomena"]["twin_t2v"] <= 100
  lines = [line for line in text.splitlines() if line.startswith("| ")]
  assert [line.split(" | ")[0] for line in lines[1:]] == ["| CLIP4Clip baseline", "| + NegNCE"]
  assert "static ceiling" in text and os.path.isfile(os.path.join(out, "table.md"))
  capsys.readouterr()
  ablation.main(argv)
  assert capsys.readouterr().out.count("done before, skipped") == 2
