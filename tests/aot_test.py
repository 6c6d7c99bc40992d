"""Tests of tvr_jax.aot: compiling the real programs for absent TPUs and GPUs.

Compiling needs the AOT extras (`bash tools/install_aot.sh`, which `install.sh` runs). They stay out
of this test process: every compile runs in a child started with `aot.compile_env()`, so the rest
of the suite never loads libtpu. Tiny CLIP, batch 8, 4 frames of 32 px: each compile takes seconds
on an idle CPU.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tvr_jax import aot

# A tiny version of the MSR-VTT recipe (the real step, head and losses; tiny towers).
TINY = """
from configs import msrvtt
def tiny(**changes):
  c = msrvtt.get_config()
  c.init_from, c.clip_preset, c.image_size, c.num_frames = "", "tiny", 32, 4
  c.batch_size, c.eval_batch_size, c.score_budget_mb = 8, 8, 4
  for k, v in changes.items():
    if k.startswith("mesh_"):
      setattr(c.mesh, k[5:], v)
    else:
      setattr(c, k, v)
  return c
"""
TINY_FLAGS = ["--config.init_from=", "--config.clip_preset=tiny", "--config.image_size=32",
              "--config.num_frames=4", "--config.eval_batch_size=8", "--config.score_budget_mb=4"]


def _need_extras():
  missing = aot.missing_extras()
  if missing:
    pytest.fail(f"AOT extras missing from {aot.extras_dir()} ({', '.join(missing)}): run "
                f"`{aot.INSTALL_COMMAND}` (CI does)")


def _child(code: str, timeout: int = 900) -> dict:
  """Runs `code` with the AOT extras; it prints one JSON line last, which is returned."""
  _need_extras()
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(TINY) + textwrap.dedent(code)],
                        capture_output=True, text=True, timeout=timeout, cwd=aot.REPO_ROOT,
                        env=aot.compile_env())
  if proc.returncode != 0:
    pytest.fail(f"child failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n"
                f"{proc.stderr[-6000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _cli(*args: str, env=None, timeout: int = 900) -> subprocess.CompletedProcess:
  """`python -m tvr_jax.aot ARGS` exactly as a user runs it (it re-executes with the extras)."""
  child_env = dict(os.environ)
  child_env["PYTHONPATH"] = aot.REPO_ROOT + os.pathsep + child_env.get("PYTHONPATH", "")
  child_env.pop("TVR_JAX_AOT_CHILD", None)
  child_env.update(env or {})
  return subprocess.run([sys.executable, "-m", "tvr_jax.aot", *args], capture_output=True,
                        text=True, timeout=timeout, cwd=aot.REPO_ROOT, env=child_env)


# ------------------------------------------------------------------------------------------------
# Pure parts: targets, HLO parsing, collective roles.
# ------------------------------------------------------------------------------------------------
def test_parse_target_tpu_and_gpu():
  t = aot.parse_target("v5e:2x2")
  assert (t.device.kind, t.device.model, t.num_devices, t.topology) == ("tpu", "v5e", 4, "v5e:2x2")
  assert aot.parse_target("v4:2x2x1").num_devices == 4
  assert aot.parse_target("v6e:2x4", num_slices=2).num_devices == 16
  g = aot.parse_target("8xH100")
  assert (g.device.kind, g.num_devices, g.topology) == ("gpu", 8, "1x1x8")
  assert aot.parse_target("16xA100-80GB").topology == "1x2x8"
  assert aot.parse_target("1xH200").device.memory_bytes > 140e9
  # The default usable share of GPU memory is JAX's preallocation (75%); the flag overrides it.
  assert g.device.usable_bytes == int(0.75 * g.device.memory_bytes)
  assert aot.parse_target("8xH100", memory_fraction=0.9).device.usable_fraction == 0.9
  for bad in ("v9z:2x2", "3xB200", "12xH100", "v5e", "H100"):
    with pytest.raises(aot.UsageError, match="target"):
      aot.parse_target(bad)


def test_every_gpu_target_has_its_proto():
  for (kind, model), spec in aot.load_devices().items():
    assert spec.memory_bytes > 0 and spec.bf16_flops > 0 and spec.hbm_bytes_per_s > 0, model
    if kind == "gpu":
      with open(os.path.join(aot.TARGETS_DIR, spec.target_config)) as f:
        proto = f.read()
      assert f"device_memory_size: {spec.memory_bytes}" in proto, model


HLO = "\n".join([
    "",
    "  %all-gather.1 = f32[8,32,64]{2,1,0} all-gather(f32[2,32,64]{2,1,0} %p.1), channel_id=1, "
    'replica_groups=[1,4]<=[4], dimensions={0}, metadata={op_name="jit(step_fn)/jvp()/mul"}',
    "  %all-gather-start.2 = (bf16[64,64]{1,0}, bf16[64,256]{1,0}) all-gather-start("
    "bf16[64,64]{1,0} %w), channel_id=2, dimensions={1}",
    "  %all-gather-done.2 = bf16[64,256]{1,0} all-gather-done((bf16[64,64]{1,0}, "
    "bf16[64,256]{1,0}) %all-gather-start.2)",
    "  %all-reduce.3 = (f32[64,256]{1,0}, f32[256]{0}) all-reduce(f32[64,256]{1,0} %g.1, "
    "f32[256]{0} %g.2), channel_id=3, to_apply=%add",
    "  %all-reduce.4 = f32[] all-reduce(f32[] %n), channel_id=4, to_apply=%add",
    "  %fusion.5 = f32[16,256]{1,0} fusion(f32[64,256]{1,0} %g.3), kind=kOutput, "
    "calls=%all-reduce-scatter.5",
    "  %all-to-all.6 = f32[4,2]{1,0} all-to-all(f32[4,2]{1,0} %x), dimensions={0}",
    "  %add.7 = f32[8]{0} add(f32[8]{0} %a, f32[8]{0} %b)",
    "",
])


def test_parse_collectives_kinds_bytes_and_names():
  cs = aot.parse_collectives(HLO)
  assert [c.kind for c in cs] == ["all-gather", "all-gather", "all-reduce", "all-reduce",
                                  "reduce-scatter", "all-to-all"]
  # Bytes per device: the larger of operands and results (by hand: 8*32*64*4, 64*256*2, ...).
  assert [c.bytes for c in cs] == [65536, 32768, 64 * 256 * 4 + 256 * 4, 4, 64 * 256 * 4, 32]
  assert cs[0].op_name == "jit(step_fn)/jvp()/mul"
  summary = aot.collective_summary(cs)
  assert summary["all-gather"] == (2, 65536 + 32768)
  assert summary["collective-permute"] == (0, 0)


def test_instructions_sharing_a_channel_are_one_collective():
  line = ("  %all-gather.{i} = f32[8,32]{{1,0}} all-gather(f32[2,32]{{1,0}} %p.{i}), "
          "channel_id={ch}, dimensions={{0}}")
  text = "\n".join(line.format(i=i, ch=ch) for i, ch in enumerate([7, 7, 9, 7]))
  cs = aot.parse_collectives(text)
  assert [(c.name, c.copies) for c in cs] == [("all-gather.0", 3), ("all-gather.2", 1)]
  assert aot.collective_summary(cs)["all-gather"] == (2, 2 * 8 * 32 * 4)
  # Without a channel id every instruction is its own collective.
  assert len(aot.parse_collectives(text.replace("channel_id=7, ", ""))) == 4


def test_classify_roles():
  cs = aot.parse_collectives(HLO)
  params = [(64, 256), (256,), (16, 256)]
  features = aot.feature_shapes(8, 32, 4, 64)
  roles = [aot.classify(c, features, params) for c in cs]
  assert roles == [aot.FEATURE_GATHER, aot.PARAMETER_GATHER, aot.GRADIENT_REDUCTION,
                   aot.SCALAR_REDUCTION, aot.GRADIENT_REDUCTION, aot.UNEXPECTED]
  # XLA:GPU's combined gradients: one flat buffer of (up to) the parameters' total size.
  flat = aot.Collective("all-reduce", "g", 4 * 16640, "f32[16640]{0}", "")
  assert aot.classify(flat, features, params) == aot.GRADIENT_REDUCTION
  # A gather that is neither a batch feature nor a weight is flagged.
  odd = aot.Collective("all-gather", "x", 4, "f32[3,5]{1,0}", "")
  assert aot.classify(odd, features, params) == aot.UNEXPECTED
  # So is an activation with a batch dimension that is not one of the head's features, while a
  # feature gathered over two mesh axes ([B / 2, 2, L] layout) is recognised.
  act = aot.Collective("all-gather", "y", 4, "f32[8,17,64]{2,1,0}", "")
  assert aot.classify(act, features, params) == aot.UNEXPECTED
  two_step = aot.Collective("all-gather", "z", 4, "s32[4,2,32]{2,1,0}", "")
  assert aot.classify(two_step, features, params) == aot.FEATURE_GATHER


# ------------------------------------------------------------------------------------------------
# The command line: environment and usage errors (exit 2).
# ------------------------------------------------------------------------------------------------
def test_cli_without_extras_says_how_to_install(tmp_path):
  proc = _cli("--config=configs/msrvtt.py", "--target=v5e:2x2",
              env={aot.EXTRAS_ENV: str(tmp_path / "nothing-here")}, timeout=120)
  assert proc.returncode == aot.EXIT_USAGE
  assert aot.INSTALL_COMMAND in proc.stderr and "requirements-aot.txt" in proc.stderr


def test_cli_bad_target_is_a_usage_error():
  _need_extras()
  proc = _cli("--config=configs/msrvtt.py", "--target=v9z:2x2", timeout=300)
  assert proc.returncode == aot.EXIT_USAGE, proc.stderr[-2000:]
  assert "unknown TPU 'v9z'" in proc.stderr


# ------------------------------------------------------------------------------------------------
# Compiling the tiny recipe: TPU and GPU, memory agreement, collective structure.
# ------------------------------------------------------------------------------------------------
_COMPILE_AND_CHECK = """
import json
from tvr_jax import aot, sharding, train
tgt = aot.parse_target(TARGET)
lines = []
c = tiny(mesh_data=DATA, mesh_fsdp=FSDP)
rc, reports = aot.run(c, tgt, programs=("train", "eval", "score"), say=lines.append)
train_report = reports[0]
# The compiled program's own analysis, from a second lowering of the trainer's step.
mesh = sharding.make_mesh(c.mesh.to_dict(), aot.target_devices(tgt))
state, setup = train.abstract_train_state(c, mesh, 1000)
step = train.make_train_step(setup, mesh)
mem = step.lower(state, aot.abstract_batch(c, mesh, c.batch_size)).compile().memory_analysis()
out = {"rc": rc, "lines": lines, "names": [r.name for r in reports],
       "report": [train_report.argument_bytes, train_report.output_bytes, train_report.alias_bytes,
                  train_report.temp_bytes, train_report.code_bytes, train_report.peak_bytes],
       "analysis": [mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                    mem.temp_size_in_bytes, mem.generated_code_size_in_bytes],
       "flops": train_report.flops,
       "summary": aot.collective_summary(train_report.collectives),
       "roles": train_report.roles}
print(json.dumps(out))
"""


def _compile_tiny(target: str, data: int, fsdp: int) -> dict:
  return _child(_COMPILE_AND_CHECK.replace("TARGET", repr(target)).replace("DATA", str(data))
                .replace("FSDP", str(fsdp)))


def _check_fits_and_memory(out: dict, target: str):
  assert out["rc"] == aot.EXIT_FITS, out["lines"]
  assert out["lines"][-1].startswith("fits:") and target in out["lines"][-1]
  assert [n.split(" ")[0] for n in out["names"]] == ["train", "encode", "encode", "score"]
  arg, res, alias, temp, code, peak = out["report"]
  assert [arg, res, alias, temp, code] == out["analysis"]
  assert peak == arg + res - alias + temp + code
  assert arg > 0 and temp > 0
  # TPU: libtpu's cost analysis; GPU: the host's of the partitioned module (aot_gpu_flops_test).
  assert out["flops"] > 0
  assert any(line.strip().startswith("ESTIMATE (roofline") for line in out["lines"])
  # The printed peak is that number, against the device's memory.
  assert any(f"peak {peak / aot.GIB:.2f} of" in line for line in out["lines"])


# Data parallelism on 4 devices, as docs/aot.md states it: the towers run on each device's batch
# shard with no collective; the 5 per-sample features the head needs are gathered once (sentence,
# words, text mask, frame tokens, frame mask); the gradients are reduced once (XLA combines the
# per-parameter all-reduces into one); nothing else.
DP_STRUCTURE = {"all-gather": 5, "all-reduce": 1, "reduce-scatter": 0, "all-to-all": 0,
                "collective-permute": 0}


@pytest.mark.devices(4)
def test_cpu_4_devices_data_parallel_collectives_are_exactly_the_design():
  # 4 simulated CPU devices: XLA:CPU keeps every collective as the partitioner made it.
  import jax
  from tvr_jax import sharding
  scope: dict = {}
  exec(textwrap.dedent(TINY), scope)   # the same tiny recipe the compile-only children use
  c = scope["tiny"](mesh_data=4, mesh_fsdp=1)
  r = aot.compile_train_step(c, sharding.make_mesh(c.mesh.to_dict(), jax.devices()))
  summary = aot.collective_summary(r.collectives)
  assert {k: v[0] for k, v in summary.items()} == DP_STRUCTURE, summary
  assert sorted(r.roles) == [aot.FEATURE_GATHER] * 5 + [aot.GRADIENT_REDUCTION]


def test_tpu_v5e_2x2_data_parallel_fits_memory_and_collectives():
  out = _compile_tiny("v5e:2x2", 4, 1)
  _check_fits_and_memory(out, "v5e:2x2")
  # libtpu clones a feature's gather into each fusion that reads it (same channel_id); counted
  # once, the structure is exactly the design's, as on CPU devices.
  assert sorted(out["roles"]) == [aot.FEATURE_GATHER] * 5 + [aot.GRADIENT_REDUCTION], out["roles"]
  assert {k: v[0] for k, v in out["summary"].items()} == DP_STRUCTURE, out["summary"]


def test_tpu_v5e_2x2_fsdp_collectives_are_only_gathers_and_gradient_reductions():
  out = _compile_tiny("v5e:2x2", 2, 2)
  assert out["rc"] == aot.EXIT_FITS, out["lines"]
  roles = out["roles"]
  # FSDP adds per-layer weight gathers, gradient reduce-scatters and scalar norm reductions; the
  # only activations that move are the features (gathered over both axes, in up to two steps) and
  # the last vision block's class-token rows (docs/aot.md).
  assert aot.UNEXPECTED not in roles, [line for line in out["lines"] if "unexpected" in line]
  assert set(roles) <= {aot.FEATURE_GATHER, aot.PARAMETER_GATHER, aot.CLASS_TOKEN,
                        aot.GRADIENT_REDUCTION, aot.SCALAR_REDUCTION}
  assert roles.count(aot.FEATURE_GATHER) >= 5
  assert roles.count(aot.PARAMETER_GATHER) > 0 and roles.count(aot.GRADIENT_REDUCTION) > 0
  assert out["summary"]["reduce-scatter"][0] > 0
  assert out["summary"]["all-to-all"][0] == 0 and out["summary"]["collective-permute"][0] == 0


def test_gpu_4xh100_data_parallel_fits_memory_and_collectives():
  out = _compile_tiny("4xH100", 4, 1)
  _check_fits_and_memory(out, "4xH100")
  # XLA:GPU combines the 5 feature gathers into one all-gather and the gradients into one
  # all-reduce of a flat buffer.
  counts = {k: v[0] for k, v in out["summary"].items()}
  assert counts == {"all-gather": 1, "all-reduce": 1, "reduce-scatter": 0, "all-to-all": 0,
                    "collective-permute": 0}, counts
  assert sorted(out["roles"]) == [aot.FEATURE_GATHER, aot.GRADIENT_REDUCTION], out["roles"]


# ------------------------------------------------------------------------------------------------
# A program that cannot fit: TPU (the compiler refuses) and GPU (our comparison refuses).
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["v5e:2x2", "1xH100"])
def test_cli_reports_a_program_that_cannot_fit(target):
  # 65,536 clips x 4 frames: the tiny towers' activations alone need hundreds of GiB per device.
  proc = _cli("--config=configs/msrvtt.py", f"--target={target}", "--programs=train",
              "--config.batch_size=65536", "--config.mesh.data=-1", *TINY_FLAGS)
  lines = proc.stdout.strip().splitlines()
  assert proc.returncode == aot.EXIT_DOES_NOT_FIT, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert lines[-1].startswith("does not fit:") and target in lines[-1]


def test_gradient_caching_flops_count_every_micro_batch():
  """XLA counts a loop body once; the report scales the cached step by an unrolled count, so it
  comes out near 4/3 of the plain step's (one extra tower forward), not 1/k of it."""
  import jax
  from tvr_jax import sharding
  scope: dict = {}
  exec(textwrap.dedent(TINY), scope)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  plain = aot.compile_train_step(scope["tiny"](mesh_data=1, mesh_fsdp=1), mesh)
  cached = aot.compile_train_step(scope["tiny"](mesh_data=1, mesh_fsdp=1, accum_steps=4), mesh)
  assert "for the 4 micro-batch loops" in cached.flops_note, cached
  assert "accum_steps 4" in cached.name, cached
  assert 1.1 < cached.flops / plain.flops < 1.6, (cached.flops, plain.flops)
