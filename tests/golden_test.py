"""Every key of the golden reference file against the JAX DMAE head, NegNCE and TPM-CL.

The file comes from `TVR_GOLDEN_FILE` (default: SHARED_DIR/golden/dmae_reference.npz); B, L, N_v and
D are read from the arrays, so a held-back file with other sizes runs through the same test. Float32
with full-precision matrix products; tolerances of golden/README.md §8, measured relative to each
array's max |value|. `metrics/*` keys are covered by tests/metrics_test.py.

`python tests/golden_test.py` prints the largest relative error per group.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import SHARED_DIR  # noqa: E402
from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tvr_jax import losses  # noqa: E402
from tvr_jax.models import dmae, tpmcl  # noqa: E402

GOLDEN_FILE = os.environ.get("TVR_GOLDEN_FILE",
                             os.path.join(SHARED_DIR, "golden", "dmae_reference.npz"))
CASES = ("small", "clip")
VARIANTS = [f"{i}_nfc{n}_twm{t}" for i in ("ti", "att_ti") for n in (0, 1) for t in (0, 1)]

pytestmark = pytest.mark.skipif(
    not os.path.exists(GOLDEN_FILE),
    reason=f"golden file {GOLDEN_FILE} not found (set TVR_GOLDEN_FILE to its path)")

# Relative limits (max |pred - ref| / max |ref| per array), golden/README.md §8.
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
  bsz, num_words, dim = w_raw.shape
  num_frames = f_raw.shape[1]
  preds = {}
  s_n, w_n, f_n = (dmae.l2_normalize(x) for x in (s_raw, w_raw, f_raw))
  preds["s"], preds["Wn"], preds["Fn"] = s_n, w_n, f_n
  # The reference received s already normalised and W, F raw (it normalises those itself).
  s_ref = jnp.asarray(r["s"], dtype)

  def similarity(variant, s, w, f, normalize):
    inter, nfc, twm = variant.rsplit("_", 2)
    return dmae.dmae_similarity(
        s, w, m_kw if twm == "twm1" else m_t, f, m_v, textual_attention=inter == "att_ti",
        visual_attention=nfc == "nfc1", normalize=normalize)

  @jax.jit
  def contrastive(sim):
    return {"negnce_t2v": losses.negnce(sim), "negnce_v2t": losses.negnce(sim.T),
            "negnce_sym": losses.negnce_symmetric(sim), "crossen_t2v": losses.infonce(sim),
            "crossen_v2t": losses.infonce(sim.T), "crossen_sym": losses.infonce_symmetric(sim),
            "dnegnce_sym_dS": jax.grad(losses.negnce_symmetric)(sim),
            "hardneg": losses.hard_negative_mask(sim).astype(jnp.int8)}

  # One compiled function for all 8 variants (compiling each separately costs more than running).
  all_sims = jax.jit(lambda s, w, f: {v: similarity(v, s, w, f, True) for v in VARIANTS})
  for variant, sim in all_sims(s_ref, w_raw, f_raw).items():
    preds[f"S_{variant}"] = sim
    for name, value in contrastive(sim).items():
      preds[f"{name}_{variant}"] = value

  # TPM-CL predictors from the golden torch parameters; sizes come from the arrays.
  predictors = {}
  for name, (nq, nk) in (("v2t_xwp", (num_frames, num_words)), ("t2v_xwp", (1, num_frames))):
    module = tpmcl.CrossModalWeightPredictor(nq, nk, dim, rngs=nnx.Rngs(0))
    names = list(tpmcl._TORCH_NAMES) + list(tpmcl.UNUSED_TORCH_NAMES)
    tpmcl.load_torch_xwp(module, {n: r[f"param/{name}/{n}"] for n in names})
    predictors[name] = module
  graph_w, params_w = nnx.split(predictors["v2t_xwp"])
  graph_v, params_v = nnx.split(predictors["t2v_xwp"])
  # The stored float32 parameters are exact; in float64 mode their gradients are float64 too.
  params_w, params_v = (jax.tree.map(lambda x: x.astype(dtype), p) for p in (params_w, params_v))

  def tpm(s, w, f, pw, pv, partial_type):
    return tpmcl.tpm_loss(s, w, f, m_v, nnx.merge(graph_w, pw), nnx.merge(graph_v, pv),
                          partial_type=partial_type)

  all_types = jax.jit(lambda *a: {t: tpm(*a, t) for t in (2, 3, 4)})
  for partial_type, (loss, out) in sorted(all_types(s_ref, w_n, f_n, params_w, params_v).items()):
    preds[f"tpm/loss_type{partial_type}"] = loss
  for k in ("a", "b", "tg", "tgp") + tuple(f"T{i}_x{j}" for i in (1, 2, 3) for j in (1, 2)):
    preds[f"tpm/{k}"] = out[k]
  preds["tpm/word_keep"] = out["word_keep"].astype(jnp.int32)
  preds["tpm/vis_keep"] = out["vis_keep"].astype(jnp.int32)

  def total(s, w, f, pw, pv, normalize):
    """loss_total = negnce_sym(S_att_ti_nfc1_twm0) + tpm type 4, as forward_stage3 forms it."""
    sim = similarity("att_ti_nfc1_twm0", s, w, f, normalize)
    if normalize:
      s, w, f = dmae.l2_normalize(s), dmae.l2_normalize(w), dmae.l2_normalize(f)
    neg = losses.negnce_symmetric(sim)
    tpm_value, _ = tpm(s, w, f, pw, pv, 4)
    return neg + tpm_value, (neg, tpm_value)

  # Unit-norm inputs as the head received them (s is not renormalised by the head).
  grad_fn = jax.jit(jax.grad(lambda *a: total(*a, normalize=False), argnums=(0, 1, 2, 3, 4),
                             has_aux=True))
  (g_s, g_wn, g_fn, g_pw, g_pv), _ = grad_fn(s_ref, w_n, f_n, params_w, params_v)
  (value, (neg, tpm_value)) = jax.jit(total, static_argnums=5)(s_ref, w_n, f_n, params_w,
                                                               params_v, False)
  preds["loss_total"], preds["loss_negnce_sym"], preds["loss_tpm"] = value, neg, tpm_value
  preds["grad/s"], preds["grad/Wn"], preds["grad/Fn"] = g_s, g_wn, g_fn
  for name, grads in (("v2t_xwp", g_pw), ("t2v_xwp", g_pv)):
    for torch_name, g in tpmcl.xwp_state_to_torch(grads).items():
      preds[f"grad/param/{name}/{torch_name}"] = g
  # Raw inputs through the normalisation: the head's own division for W and F, F.normalize for s.
  raw_grad_fn = jax.jit(jax.grad(lambda *a: total(*a, normalize=True)[0], argnums=(0, 1, 2)))
  preds["grad/s_raw"], preds["grad/W"], preds["grad/F"] = raw_grad_fn(
      s_raw, w_raw, f_raw, params_w, params_v)
  assert bsz == s_raw.shape[0]
  return {f"{prefix}/{k}": np.asarray(v) for k, v in preds.items()}, r.read


_CACHE = {}


def _results(dtype=jnp.float32):
  if "results" not in _CACHE:
    data = np.load(GOLDEN_FILE)
    out = {"data": data, "preds": {}, "read": set()}
    with jax.default_matmul_precision("highest"):
      for case in CASES:
        preds, read = compute_case(data, case, dtype)
        out["preds"].update(preds)
        out["read"] |= read
    _CACHE["results"] = out
  return _CACHE["results"]


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


def group_errors(by=_group):
  """{group: (max relative error, key where it occurs)} over both cases."""
  res = _results()
  worst = {}
  for key, pred in res["preds"].items():
    group = by(key)
    err = relative_error(pred, res["data"][key])
    if group not in worst or err > worst[group][0]:
      worst[group] = (err, key)
  return worst


def test_every_key_is_covered():
  res = _results()
  all_keys = set(res["data"].files)
  metrics_keys = {k for k in all_keys if k.startswith("metrics/")}  # tests/metrics_test.py
  compared = set(res["preds"])
  assert not compared - all_keys, f"predicted keys absent from the file: {compared - all_keys}"
  missing = all_keys - compared - res["read"] - metrics_keys
  assert not missing, f"golden keys neither compared nor used as inputs: {sorted(missing)}"
  assert compared | res["read"] | metrics_keys == all_keys
  # Inputs are inputs only: everything that is an output of the reference is compared.
  assert not compared & res["read"] - {f"{c}/s" for c in CASES}


@pytest.mark.parametrize("case", CASES)
def test_golden_values(case):
  res = _results()
  failures = []
  for key, pred in res["preds"].items():
    if not key.startswith(case + "/"):
      continue
    ref = res["data"][key]
    group = _group(key)
    if group == "exact":
      ok = np.array_equal(np.asarray(pred).astype(np.int64), ref.astype(np.int64))
      err = 0.0 if ok else 1.0
    elif group == "zero":
      err = float(np.max(np.abs(pred))) + float(np.max(np.abs(ref)))
    else:
      err = relative_error(pred, ref)
    if not err <= LIMITS[group]:
      failures.append(f"{key} ({group}): relative error {err:.3g} > {LIMITS[group]:g}")
  assert not failures, "\n".join(failures)


def test_decisions_match_in_every_variant():
  """Sanity of the discrete structure: empty H exists in small/ ti (positive term only)."""
  res = _results()
  for case in CASES:
    for variant in VARIANTS:
      key = f"{case}/hardneg_{variant}"
      np.testing.assert_array_equal(res["preds"][key], res["data"][key])
  assert not np.any(res["preds"]["small/hardneg_ti_nfc0_twm0"])


if __name__ == "__main__":
  # `python tests/golden_test.py [--x64]`: the error table, in float32 or in float64 (where the
  # README expects agreement to 1e-10).
  if not os.path.exists(GOLDEN_FILE):
    sys.exit(f"golden file {GOLDEN_FILE} not found (set TVR_GOLDEN_FILE)")
  if "--x64" in sys.argv:
    jax.config.update("jax_enable_x64", True)
    _results(jnp.float64)
  print(f"golden file: {GOLDEN_FILE}; dtype {'float64' if '--x64' in sys.argv else 'float32'}")
  for group, (err, key) in sorted(group_errors().items()):
    print(f"{group:8s} max relative error {err:.3e}  (at {key}; limit {LIMITS[group]:g})")
  print("by family (max |pred - ref| / max |ref|, both cases):")
  for family, (err, key) in sorted(group_errors(_family).items()):
    print(f"  {family:24s} {err:.3e}  ({key})")
