"""`--max_batch` (tvr_jax.aot.find_max_batch): the largest global batch whose train step fits.

The search logic is checked against brute force with a stand-in compiler (cheap, every edge
case, the TPU compiler's refusal included); the real search by compiling the tiny step for a GPU
target whose device memory is shrunk so that the answer is 2 or 3, then compiling the answer B
and B + 1 independently of the search; and the command line prints the four searches. The
compiles run in children with the AOT extras (aot_test.py).
"""

import types

import pytest
from aot_test import TINY_FLAGS, _child, _cli

from tvr_jax import aot


# ------------------------------------------------------------------------------------------------
# The search against brute force (no compiler).
# ------------------------------------------------------------------------------------------------
def _mesh(data: int, fsdp: int = 1):
  return types.SimpleNamespace(shape={"data": data, "fsdp": fsdp})


def _target(memory_bytes: int) -> aot.Target:
  spec = aot.DeviceSpec(kind="gpu", model="fake", memory_bytes=memory_bytes, bf16_flops=1.0,
                        fp32_flops=1.0, hbm_bytes_per_s=1.0, link_bytes_per_s=1.0)
  return aot.Target("1xfake", spec, 1, "1x1x1")


def _report(peak: int) -> aot.ProgramReport:
  return aot.ProgramReport(name="train step", argument_bytes=peak, output_bytes=0, alias_bytes=0,
                           temp_bytes=0, code_bytes=0, flops=None, bytes_accessed=0.0,
                           flops_source="unavailable", collectives=[], compile_seconds=0.0)


@pytest.mark.parametrize("data,accum", [(1, 1), (3, 1), (4, 1), (2, 4), (8, 1)])
@pytest.mark.parametrize("capacity", [0, 1, 7, 8, 9, 24, 100, 1000, 10 ** 6])
@pytest.mark.parametrize("limit", [8, 50, 64, 100, 8192])
@pytest.mark.parametrize("refuse", [False, True])
def test_search_matches_brute_force(monkeypatch, data, accum, capacity, limit, refuse):
  """Peak = 1000 + 10 b bytes: batch b fits when b <= capacity (by our comparison, or, with
  `refuse`, the compiler refuses it as libtpu does)."""
  unit = data * accum
  compiled = []

  def fake_compile(config, mesh, b, gpu_flops=True):
    assert b % unit == 0 and 0 < b <= limit, (b, unit, limit)   # only valid batches
    compiled.append(b)
    if refuse and b > capacity:
      raise aot.DoesNotFit("RESOURCE_EXHAUSTED")
    return _report(1000 + 10 * b)

  monkeypatch.setattr(aot, "compile_train_step", fake_compile)
  config = types.SimpleNamespace(accum_steps=accum)
  target = _target(1000 + 10 * capacity)
  best = aot.find_max_batch(config, _mesh(data), target, limit=limit, say=lambda _: None)
  expected = max([b for b in range(unit, limit + 1, unit) if b <= capacity], default=0)
  assert best == expected
  assert len(compiled) == len(set(compiled))                    # no batch compiled twice
  steps = max(limit // unit, 1).bit_length()
  assert len(compiled) <= 2 * steps + 1, compiled


def test_search_limit_below_one_unit_is_an_error():
  with pytest.raises(ValueError, match="limit=2 is below one batch unit"):
    aot.find_max_batch(types.SimpleNamespace(accum_steps=1), _mesh(4), _target(1), limit=2)


# ------------------------------------------------------------------------------------------------
# The real search: tiny step, shrunk device memory, answers verified by independent compiles.
# ------------------------------------------------------------------------------------------------
_SEARCH = """
import dataclasses, json
from tvr_jax import aot, sharding
tgt = aot.parse_target("1xH100")
c = tiny(mesh_data=1, mesh_fsdp=1)
mesh = sharding.make_mesh(c.mesh.to_dict(), aot.target_devices(tgt))
unit = aot.batch_unit(c, mesh)
# Device memory shrunk to the peak of batch 2 units: the answer is 2 units or, if 3 units happen to
# need no more memory, 3 (the limit). The search compiles 1, 2 (doubling) and 3 (bisection).
memory = aot.compile_train_step(c, mesh, 2 * unit).peak_bytes
tgt = dataclasses.replace(tgt, device=dataclasses.replace(tgt.device, memory_bytes=memory,
                                                          usable_fraction=1.0))
lines = []
best = aot.find_max_batch(c, mesh, tgt, limit=3 * unit, say=lines.append)
# Independently of the search: compile B and B + unit again.
peaks = [aot.compile_train_step(c, mesh, b).peak_bytes for b in (best, best + unit)]
print(json.dumps({"best": best, "unit": unit, "memory": memory, "peaks": peaks, "lines": lines}))
"""


def test_find_max_batch_fits_and_one_more_unit_does_not():
  # A GPU target: XLA:GPU compiles any size and our comparison with the (shrunk) device memory
  # decides, as for every GPU verdict. (A TPU's refusal is the `refuse` case above: a real one
  # needs a program over libtpu's 15.75 GiB, minutes of compiling.)
  r = _child(_SEARCH)
  best, unit, memory = r["best"], r["unit"], r["memory"]
  assert unit == 1 and best in (2, 3), r
  fit_peak, next_peak = r["peaks"]
  assert fit_peak <= memory < next_peak, r
  assert [line.split(":")[0].strip() for line in r["lines"]] == ["batch 1", "batch 2", "batch 3"]
  assert all(line.endswith(" s)") for line in r["lines"]), r["lines"]


def test_cli_max_batch_prints_the_four_searches():
  # --max_batch_limit=1 keeps it to one compile per search (the searches are tested above); the
  # tiny step at batch 1 fits an H100, so each line says the limit stopped it.
  proc = _cli("--config=configs/msrvtt.py", "--target=1xH100", "--programs=train", "--max_batch",
              "--max_batch_limit=1", "--config.batch_size=1", *TINY_FLAGS)
  out = proc.stdout.strip().splitlines()
  assert proc.returncode == aot.EXIT_FITS, proc.stdout[-3000:] + proc.stderr[-3000:]
  found = [line.strip() for line in out if ": largest batch " in line]
  assert found == [f"{dtype}, remat {remat}: largest batch 1 (the search limit; larger not tried)"
                   for dtype in ("float32", "bfloat16") for remat in ("off", "on")], out
  assert sum("    batch 1: peak " in line for line in out) == 4, out
  assert out[-1].startswith("fits:"), out[-1]


def test_cli_max_batch_limit_below_one_unit_is_a_usage_error():
  proc = _cli("--config=configs/msrvtt.py", "--target=v5e:2x2", "--programs=train",
              "--max_batch", "--max_batch_limit=2", "--config.mesh.data=-1", *TINY_FLAGS,
              timeout=300)
  assert proc.returncode == aot.EXIT_USAGE, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "--max_batch_limit=2: below one batch unit (4" in proc.stderr


def test_batch_unit_counts_accum_steps():
  assert aot.batch_unit(types.SimpleNamespace(accum_steps=3), _mesh(2, 2)) == 12
