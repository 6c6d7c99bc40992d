"""Every key of the golden reference file against the JAX DMAE head, NegNCE and TPM-CL.

The file comes from `TVR_GOLDEN_FILE` (default: the reference material beside the repository, see
`conftest.golden_file_path`). A missing file skips these tests, or fails them when `CI` is set.

Every assertion holds for any reference file with these keys: B, L, N_v and D are read from the
arrays, and facts about the discrete structure are checked as conditions on what the file holds
(e.g. "where the reference's hard-negative set is empty, NegNCE is its positive term alone"), never
as facts about one file's data. `test_checks_hold_for_a_reordered_reference` runs every check on a
rearranged copy of the file (cases swapped, batches permuted) to keep it that way.

Float32 with full-precision matrix products; tolerances relative to each array's max |value| (the
float32 limits the reference's authors measured by running their code in float32). `metrics/*`
keys are covered by tests/metrics_test.py.

`PYTHONPATH=. python tests/golden_test.py [--x64]` prints the largest relative error per group.
"""

import functools
import os
import subprocess
import sys

from conftest import REPO_ROOT, golden_file_path, require_golden_file
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tvr_jax import losses
from tvr_jax.models import dmae, tpmcl

CASES = ("small", "clip")
VARIANTS = [f"{i}_nfc{n}_twm{t}" for i in ("ti", "att_ti") for n in (0, 1) for t in (0, 1)]

# Relative limits (max |pred - ref| / max |ref| per array) for float32 against the float64
# reference.
LIMITS = {"values": 1e-5, "losses": 1e-4, "grads": 1e-4, "exact": 0.0, "zero": 0.0}


class _Reader:
  """Wraps the npz so that every input key the computation reads is recorded."""

  def __init__(self, data, prefix):
    self.data, self.prefix, self.read = data, prefix, set()

  def __getitem__(self, key):
    self.read.add(self.prefix + key)
    return np.asarray(self.data[self.prefix + key])


def _group(key: str) -> str:
  name = key.split("/", 1)[1]
  if name.startswith("grad/param/t2v_xwp/"):
    return "zero"
  if name.startswith(("hardneg_", "tpm/word_keep", "tpm/vis_keep")):
    return "exact"
  if name.startswith(("grad/", "dnegnce_")):
    return "grads"
  if name.startswith(("negnce_", "crossen_", "loss_", "tpm/loss_")):
    return "losses"
  return "values"


def _similarity(variant, s, w, f, m_t, m_kw, m_v, normalize):
  inter, nfc, twm = variant.rsplit("_", 2)
  return dmae.dmae_similarity(
      s, w, m_kw if twm == "twm1" else m_t, f, m_v, textual_attention=inter == "att_ti",
      visual_attention=nfc == "nfc1", normalize=normalize)


# One compiled function for all 8 variants (compiling each separately costs more than running).
# Module-level and with every array an argument, so a second file of the same sizes (the
# reordered reference below) reuses the compiled code.
@jax.jit
def _all_similarities(s, w, f, m_t, m_kw, m_v):
  return {v: _similarity(v, s, w, f, m_t, m_kw, m_v, True) for v in VARIANTS}


@jax.jit
def _contrastive(sim):
  return {"negnce_t2v": losses.negnce(sim), "negnce_v2t": losses.negnce(sim.T),
          "negnce_sym": losses.negnce_symmetric(sim), "crossen_t2v": losses.infonce(sim),
          "crossen_v2t": losses.infonce(sim.T), "crossen_sym": losses.infonce_symmetric(sim),
          "dnegnce_sym_dS": jax.grad(losses.negnce_symmetric)(sim),
          "hardneg": losses.hard_negative_mask(sim).astype(jnp.int8)}


def _predictor_shapes(num_frames, num_words):
  """(name, N_q, N_k) of the two TPM-CL weight predictors."""
  return (("v2t_xwp", num_frames, num_words), ("t2v_xwp", 1, num_frames))


@functools.lru_cache(maxsize=None)
def _tpm_functions(num_frames: int, num_words: int, dim: int):
  """Jitted TPM-CL and total-loss functions for one set of sizes (built once per sizes)."""
  graph_w, graph_v = (
      nnx.split(tpmcl.CrossModalWeightPredictor(nq, nk, dim, rngs=nnx.Rngs(0)))[0]
      for _, nq, nk in _predictor_shapes(num_frames, num_words))

  def tpm(s, w, f, m_v, pw, pv, partial_type):
    return tpmcl.tpm_loss(s, w, f, m_v, nnx.merge(graph_w, pw), nnx.merge(graph_v, pv),
                          partial_type=partial_type)

  def total(s, w, f, pw, pv, m_t, m_kw, m_v, normalize):
    """loss_total = negnce_sym(S_att_ti_nfc1_twm0) + tpm type 4, as forward_stage3 forms it."""
    sim = _similarity("att_ti_nfc1_twm0", s, w, f, m_t, m_kw, m_v, normalize)
    if normalize:
      s, w, f = dmae.l2_normalize(s), dmae.l2_normalize(w), dmae.l2_normalize(f)
    neg = losses.negnce_symmetric(sim)
    tpm_value, _ = tpm(s, w, f, m_v, pw, pv, 4)
    return neg + tpm_value, (neg, tpm_value)

  all_types = jax.jit(lambda s, w, f, m_v, pw, pv: {t: tpm(s, w, f, m_v, pw, pv, t)
                                                    for t in (2, 3, 4)})
  # Unit-norm inputs as the head received them (s is not renormalised by the head).
  grads = jax.jit(jax.grad(lambda *a: total(*a, normalize=False), argnums=(0, 1, 2, 3, 4),
                           has_aux=True))
  value = jax.jit(lambda *a: total(*a, normalize=False))
  # Raw inputs through the normalisation: the head's own division for W and F, F.normalize for s.
  raw_grads = jax.jit(jax.grad(lambda *a: total(*a, normalize=True)[0], argnums=(0, 1, 2)))
  return all_types, grads, value, raw_grads


def compute_case(data, prefix: str, dtype=jnp.float32):
  """Recomputes everything the golden file holds for one case (in `dtype`: float32, or float64
  when x64 is enabled).

  Returns:
    (predictions: key -> array, input keys read). Predictions cover every non-input key.
  """
  r = _Reader(data, prefix + "/")
  r["seed"]
  s_raw, w_raw, f_raw = (jnp.asarray(r[k], dtype) for k in ("s_raw", "W", "F"))
  m_t, m_kw, m_v = (jnp.asarray(r[k]) for k in ("mT", "mT_kw", "mV"))
  masks = (m_t, m_kw, m_v)
  bsz, num_words, dim = w_raw.shape
  num_frames = f_raw.shape[1]
  preds = {}
  s_n, w_n, f_n = (dmae.l2_normalize(x) for x in (s_raw, w_raw, f_raw))
  preds["s"], preds["Wn"], preds["Fn"] = s_n, w_n, f_n
  # The reference received s already normalised and W, F raw (it normalises those itself).
  s_ref = jnp.asarray(r["s"], dtype)

  for variant, sim in _all_similarities(s_ref, w_raw, f_raw, *masks).items():
    preds[f"S_{variant}"] = sim
    for name, value in _contrastive(sim).items():
      preds[f"{name}_{variant}"] = value

  # TPM-CL predictors from the golden torch parameters; sizes come from the arrays.
  params = []
  for name, nq, nk in _predictor_shapes(num_frames, num_words):
    module = tpmcl.CrossModalWeightPredictor(nq, nk, dim, rngs=nnx.Rngs(0))
    names = list(tpmcl._TORCH_NAMES) + list(tpmcl.UNUSED_TORCH_NAMES)
    tpmcl.load_torch_xwp(module, {n: r[f"param/{name}/{n}"] for n in names})
    # The stored float32 parameters are exact; in float64 mode their gradients are float64 too.
    params.append(jax.tree.map(lambda x: x.astype(dtype), nnx.split(module)[1]))
  params_w, params_v = params
  all_types, grads_fn, value_fn, raw_grads_fn = _tpm_functions(num_frames, num_words, dim)

  by_type = sorted(all_types(s_ref, w_n, f_n, m_v, params_w, params_v).items())
  for partial_type, (loss, _) in by_type:
    preds[f"tpm/loss_type{partial_type}"] = loss
  out = by_type[-1][1][1]   # the intermediates of the last partial type
  for k in ("a", "b", "tg", "tgp") + tuple(f"T{i}_x{j}" for i in (1, 2, 3) for j in (1, 2)):
    preds[f"tpm/{k}"] = out[k]
  preds["tpm/word_keep"] = out["word_keep"].astype(jnp.int32)
  preds["tpm/vis_keep"] = out["vis_keep"].astype(jnp.int32)

  (g_s, g_wn, g_fn, g_pw, g_pv), _ = grads_fn(s_ref, w_n, f_n, params_w, params_v, *masks)
  value, (neg, tpm_value) = value_fn(s_ref, w_n, f_n, params_w, params_v, *masks)
  preds["loss_total"], preds["loss_negnce_sym"], preds["loss_tpm"] = value, neg, tpm_value
  preds["grad/s"], preds["grad/Wn"], preds["grad/Fn"] = g_s, g_wn, g_fn
  for name, grads in (("v2t_xwp", g_pw), ("t2v_xwp", g_pv)):
    for torch_name, g in tpmcl.xwp_state_to_torch(grads).items():
      preds[f"grad/param/{name}/{torch_name}"] = g
  preds["grad/s_raw"], preds["grad/W"], preds["grad/F"] = raw_grads_fn(
      s_raw, w_raw, f_raw, params_w, params_v, *masks)
  assert bsz == s_raw.shape[0]
  return {f"{prefix}/{k}": np.asarray(v) for k, v in preds.items()}, r.read


_CACHE = {}


def _results(path: str, dtype=jnp.float32) -> dict:
  """{"data": the npz, "preds": key -> prediction, "read": input keys} of one file (cached)."""
  key = (os.path.abspath(path), jnp.dtype(dtype).name)
  if key not in _CACHE:
    data = np.load(path)
    out = {"data": data, "preds": {}, "read": set()}
    with jax.default_matmul_precision("highest"):
      for case in CASES:
        preds, read = compute_case(data, case, dtype)
        out["preds"].update(preds)
        out["read"] |= read
    _CACHE[key] = out
  return _CACHE[key]


def relative_error(pred: np.ndarray, ref: np.ndarray) -> float:
  """max |pred - ref| / max |ref| (absolute error where ref is all zero)."""
  pred, ref = np.asarray(pred, np.float64), np.asarray(ref, np.float64)
  if pred.shape != ref.shape:
    raise AssertionError(f"shape {pred.shape} != reference shape {ref.shape}")
  scale = np.max(np.abs(ref)) if ref.size else 0.0
  err = np.max(np.abs(pred - ref)) if ref.size else 0.0
  return float(err / scale) if scale > 0 else float(err)


def _family(key: str) -> str:
  """Finer reporting family of a key: `S_*`, `negnce_*`, `tpm/a`, `grad/param/v2t_xwp/*`, ..."""
  name = key.split("/", 1)[1]
  for prefix in ("S_", "negnce_", "crossen_", "dnegnce_sym_dS_", "hardneg_", "grad/param/v2t_xwp/",
                 "grad/param/t2v_xwp/", "tpm/T", "tpm/loss_", "loss_"):
    if name.startswith(prefix):
      return prefix + "*"
  return name


def group_errors(res: dict, by=_group) -> dict:
  """{group: (max relative error, key where it occurs)} over both cases."""
  worst = {}
  for key, pred in res["preds"].items():
    group = by(key)
    err = relative_error(pred, res["data"][key])
    if group not in worst or err > worst[group][0]:
      worst[group] = (err, key)
  return worst


# ------------------------------------------------------------------------------------------------
# The checks, as functions of one file's results, so they run on the reordered copy too.
# ------------------------------------------------------------------------------------------------
def check_coverage(res: dict) -> None:
  """Every key of the file is compared or used as an input (metrics/* have their own test)."""
  all_keys = set(res["data"].files)
  metrics_keys = {k for k in all_keys if k.startswith("metrics/")}  # tests/metrics_test.py
  compared = set(res["preds"])
  assert not compared - all_keys, f"predicted keys absent from the file: {compared - all_keys}"
  missing = all_keys - compared - res["read"] - metrics_keys
  assert not missing, f"golden keys neither compared nor used as inputs: {sorted(missing)}"
  assert compared | res["read"] | metrics_keys == all_keys
  # Inputs are inputs only: everything that is an output of the reference is compared.
  assert not compared & res["read"] - {f"{c}/s" for c in CASES}


def value_failures(res: dict, case: str) -> list[str]:
  """Keys of `case` whose prediction is outside its group's limit, with the error."""
  failures = []
  for key, pred in res["preds"].items():
    if not key.startswith(case + "/"):
      continue
    ref = res["data"][key]
    group = _group(key)
    if group == "exact":
      ok = np.array_equal(np.asarray(pred).astype(np.int64), ref.astype(np.int64))
      err = 0.0 if ok else 1.0
    elif group == "zero":   # the t2v predictor gets no gradient: zero here and in the reference
      err = float(np.max(np.abs(pred))) + float(np.max(np.abs(ref)))
    else:
      err = relative_error(pred, ref)
    if not err <= LIMITS[group]:
      failures.append(f"{key} ({group}): relative error {err:.3g} > {LIMITS[group]:g}")
  return failures


def _positive_term(sim: np.ndarray) -> float:
  """NegNCE without hard negatives, in float64: mean_i -log clip(softmax_row(100 S))_ii."""
  z = 100.0 * sim
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  return float(np.mean(-np.log(np.clip(np.diagonal(p), 1e-6, 1 - 1e-6))))


def check_decisions(res: dict) -> None:
  """The hard-negative sets H of every variant, as conditions on what the file holds.

  - ours equal the reference's;
  - the reference's H is the NegNCE rule applied to the reference's own S (i != j and S_ij beats
    S_ii or S_jj), computed here with numpy;
  - where the reference's H is empty, ours is too and NegNCE (both directions; H of S.T is H.T)
    is its positive term alone, in the reference and in our prediction.
  """
  for case in CASES:
    for variant in VARIANTS:
      key, ref_sim = f"{case}/hardneg_{variant}", np.asarray(res["data"][f"{case}/S_{variant}"])
      ref_h = np.asarray(res["data"][key]).astype(bool)
      np.testing.assert_array_equal(res["preds"][key].astype(bool), ref_h, err_msg=key)
      d = np.diagonal(ref_sim)
      rule = ((ref_sim > d[:, None]) | (ref_sim > d[None, :])) & ~np.eye(len(d), dtype=bool)
      np.testing.assert_array_equal(ref_h, rule, err_msg=f"{key} against the file's own S")
      if ref_h.any():
        continue
      for direction, sim in (("t2v", ref_sim), ("v2t", ref_sim.T)):
        loss_key = f"{case}/negnce_{direction}_{variant}"
        want = _positive_term(sim)
        assert abs(float(res["data"][loss_key]) - want) <= 1e-10 * abs(want), loss_key
        assert abs(float(res["preds"][loss_key]) - want) <= LIMITS["losses"] * abs(want), loss_key


def reorder_reference(src: str, dst: str, seed: int = 0) -> dict:
  """Writes a copy of a reference file holding the same computations arranged differently.

  The cases trade prefixes (small/ <-> clip/, so each name now holds the other case's data and
  sizes) and each case's batch is permuted, texts and videos alike: per-sample arrays along axis
  0, the [B, B] matrices (S, dNegNCE/dS, H) along both axes. Losses (means over the batch),
  parameters and their gradients (sums over it) do not change. Returns {case: permutation}.
  """
  data = np.load(src)
  per_sample = {"s", "s_raw", "W", "Wn", "F", "Fn", "mT", "mT_kw", "mV", "tpm/a", "tpm/b",
                "tpm/word_keep", "tpm/vis_keep", "tpm/tg", "tpm/tgp", "grad/s", "grad/s_raw",
                "grad/W", "grad/F", "grad/Wn", "grad/Fn"}
  rng = np.random.default_rng(seed)
  perms = {}
  for case in CASES:
    perm = rng.permutation(data[f"{case}/s_raw"].shape[0])
    perms[case] = perm[::-1] if np.array_equal(perm, np.arange(len(perm))) else perm
  other = dict(zip(CASES, CASES[::-1]))
  out = {}
  for key in data.files:
    case, name = key.split("/", 1)
    array = data[key]
    if case in perms:
      perm = perms[case]
      if name.startswith(("S_", "dnegnce_sym_dS_", "hardneg_")):
        array = array[perm][:, perm]
      elif name in per_sample or name.startswith("tpm/T"):
        array = array[perm]
      else:
        assert array.ndim == 0 or name.startswith(("param/", "grad/param/")), key
      key = f"{other[case]}/{name}"
    out[key] = array
  np.savez(dst, **out)
  return perms


# ------------------------------------------------------------------------------------------------
# Tests.
# ------------------------------------------------------------------------------------------------
def test_every_key_is_covered(golden_file):
  check_coverage(_results(golden_file))


@pytest.mark.parametrize("case", CASES)
def test_golden_values(golden_file, case):
  failures = value_failures(_results(golden_file), case)
  assert not failures, "\n".join(failures)


def test_decisions_match_in_every_variant(golden_file):
  check_decisions(_results(golden_file))


def test_checks_hold_for_a_reordered_reference(golden_file, tmp_path):
  """Every check above on a rearranged copy of the file: no check may depend on which case holds
  which data or on the batch order. (Same sizes as the original, so no new compilation.)"""
  path = str(tmp_path / "reordered.npz")
  perms = reorder_reference(golden_file, path)
  res = _results(path)
  original = _results(golden_file)
  assert not np.array_equal(res["data"]["small/s_raw"], original["data"]["clip/s_raw"])
  check_coverage(res)
  for case in CASES:
    failures = value_failures(res, case)
    assert not failures, "\n".join(failures)
  check_decisions(res)
  # And the predictions moved with the data: permuted rows of the original's.
  perm = perms["small"]
  np.testing.assert_allclose(res["preds"]["clip/S_att_ti_nfc1_twm0"],
                             original["preds"]["small/S_att_ti_nfc1_twm0"][perm][:, perm],
                             rtol=0, atol=1e-6)


def test_missing_reference_skips_or_fails_under_ci(tmp_path, monkeypatch):
  """Without the file the golden tests skip locally, but fail when CI is set, naming the path
  and the variable."""
  missing = str(tmp_path / "no_such_reference.npz")
  monkeypatch.delenv("CI", raising=False)
  with pytest.raises(pytest.skip.Exception, match="TVR_GOLDEN_FILE"):
    require_golden_file(missing)
  monkeypatch.setenv("CI", "true")
  with pytest.raises(pytest.fail.Exception) as failed:
    require_golden_file(missing)
  assert missing in str(failed.value) and "TVR_GOLDEN_FILE" in str(failed.value)
  # The same through pytest, as CI runs it: every golden test fails, none is skipped.
  env = dict(os.environ, CI="true", TVR_GOLDEN_FILE=missing, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
       os.path.join(REPO_ROOT, "tests", "golden_test.py"), "-k", "not missing_reference"],
      capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, env=env)
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0, out[-3000:]
  assert missing in out and "TVR_GOLDEN_FILE" in out, out[-3000:]
  summary = out.strip().splitlines()[-1]
  assert "skipped" not in summary and "passed" not in summary, out[-3000:]


if __name__ == "__main__":
  # `PYTHONPATH=. python tests/golden_test.py [--x64]`: the error table, in float32 or in float64
  # (where agreement to 1e-10 is expected).
  path = golden_file_path()
  if not os.path.exists(path):
    sys.exit(f"golden file {path} not found (set TVR_GOLDEN_FILE)")
  x64 = "--x64" in sys.argv
  if x64:
    jax.config.update("jax_enable_x64", True)
  results = _results(path, jnp.float64 if x64 else jnp.float32)
  print(f"golden file: {path}; dtype {'float64' if x64 else 'float32'}")
  for group, (err, key) in sorted(group_errors(results).items()):
    print(f"{group:8s} max relative error {err:.3e}  (at {key}; limit {LIMITS[group]:g})")
  print("by family (max |pred - ref| / max |ref|, both cases):")
  for family, (err, key) in sorted(group_errors(results, _family).items()):
    print(f"  {family:24s} {err:.3e}  ({key})")
