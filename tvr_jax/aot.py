r"""Ahead-of-time compilation for absent accelerators: does a recipe fit, and what does it move?

    python -m tvr_jax.aot --config=configs/msrvtt.py --target=v5e:2x2
    python -m tvr_jax.aot --config=configs/msrvtt.py --target=8xH100 --config.clip_preset=ViT-B/16
    python -m tvr_jax.aot --config=configs/msrvtt.py --target=v5e:2x2 --max_batch

Compiles, on this machine's CPU and without the accelerator, the programs a run executes: the real
train step (`tvr_jax.train.make_train_step` on the state layout of
`tvr_jax.train.abstract_train_state`), the evaluation encoders (`tvr_jax.evaluate.make_encoders`)
and one block of the chunked scorer (`tvr_jax.scoring.ChunkedScorer.lower`). For each it prints,
per device, the compiled program's memory (arguments, outputs, temporaries, peak) against the
device's memory, its FLOPs, and its collectives by kind with their bytes, and an ESTIMATE of the
step time and MFU (FLOPs over peak, bytes over memory bandwidth, collective bytes over the
interconnect; the largest of the three bounds the step). FLOPs come from the TPU compiler's cost
analysis; XLA:GPU has none without a device, so for GPU targets they come from the host's HLO cost
analysis of the per-device module XLA:GPU partitioned (`analyse`). The last line is the verdict,
`fits: ...` or `does not fit: ...`; exit status 0 fits, 1 does not fit, 2 usage or environment
error.

Targets (`--target`): a TPU topology as JAX spells it (`v5e:2x2`, `v4:2x2x1`, `v5p:2x2x1`,
`v6e:2x4`, ...; `--num_slices` for several slices), or a GPU server `NxMODEL` (`1xH100`, `8xH100`,
`8xH200`, `8xA100-40GB`, `8xA100-80GB`). Device figures and the GPU target protos are in
`tvr_jax/aot_targets/`. The TPU compiler refuses a program larger than HBM (RESOURCE_EXHAUSTED);
the GPU compiler does not, so the GPU verdict compares XLA's memory analysis with the device memory
a default JAX process may allocate (`usable_fraction`).

The compilers (libtpu, the CUDA plugin) are the extras of `requirements-aot.txt`, installed into
`.venv-aot/` by `bash tools/install_aot.sh` and kept off the main environment (libtpu there makes
every `jax.devices()` probe for a TPU). This command re-executes itself with them on its path
(`compile_env`). See docs/aot.md.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import sys
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(_PACKAGE_DIR)
TARGETS_DIR = os.path.join(_PACKAGE_DIR, "aot_targets")
EXTRAS_ENV = "TVR_JAX_AOT_EXTRAS"     # where the AOT extras are installed (default REPO/.venv-aot)
_CHILD_ENV = "TVR_JAX_AOT_CHILD"      # set in the re-executed process
INSTALL_COMMAND = "bash tools/install_aot.sh"
GIB = 1 << 30

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_USAGE = 0, 1, 2
COLLECTIVE_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
                    "collective-permute")


class UsageError(Exception):
  """Bad flags, an unknown target or missing extras: exit status 2."""


# ==================================================================================================
# Environment: the AOT extras live outside the main venv; this process re-executes itself on them.
# ==================================================================================================
def extras_dir() -> str:
  """Folder holding the AOT extras ($TVR_JAX_AOT_EXTRAS, default `.venv-aot/` in the checkout)."""
  return os.environ.get(EXTRAS_ENV) or os.path.join(REPO_ROOT, ".venv-aot")


def missing_extras(path: str | None = None) -> list[str]:
  """The AOT packages not found under `path` (empty when everything is installed)."""
  path = path or extras_dir()
  need = {"libtpu": os.path.join(path, "libtpu"),
          "jax-cuda12-plugin": os.path.join(path, "jax_plugins", "xla_cuda12"),
          "jax-cuda12-pjrt": os.path.join(path, "jax_plugins", "xla_cuda12")}
  return [name for name, p in need.items() if not os.path.isdir(p)]


def compile_env(base: Mapping[str, str] | None = None, accelerator_type: str = "v5litepod-4"
                ) -> dict[str, str]:
  """Environment of a process that compiles for absent accelerators.

  The extras folder goes first on PYTHONPATH; JAX runs on the CPU (`JAX_PLATFORMS=cpu`, so nothing
  probes for a TPU or GPU) and libtpu is told it is on a one-host slice without a metadata server.
  """
  env = dict(os.environ if base is None else base)
  parts = [extras_dir(), REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
  env.update(JAX_PLATFORMS="cpu", TPU_ACCELERATOR_TYPE=accelerator_type,
             TPU_WORKER_HOSTNAMES="localhost", TPU_SKIP_MDS_QUERY="1", TPU_WORKER_ID="0",
             ALLOW_MULTIPLE_LIBTPU_LOAD="1",
             TF_CPP_MIN_LOG_LEVEL=env.get("TF_CPP_MIN_LOG_LEVEL", "3"))
  # Without a GPU, XLA cannot autotune Triton GEMM tilings and fails on large float32 dots
  # ("Couldn't find output tile sizes"); cuBLAS GEMMs compile with heuristic configs.
  flags = env.get("XLA_FLAGS", "")
  if "xla_gpu_enable_triton_gemm" not in flags:
    env["XLA_FLAGS"] = (flags + " --xla_gpu_enable_triton_gemm=false").strip()
  env[_CHILD_ENV] = "1"
  return env


# ==================================================================================================
# Targets: devices.toml + the GPU protos.
# ==================================================================================================
@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  """One accelerator's figures (per device; see aot_targets/devices.toml)."""
  kind: str                  # "tpu" | "gpu"
  model: str                 # "v5e", "H100", ...
  memory_bytes: int
  bf16_flops: float
  fp32_flops: float
  hbm_bytes_per_s: float
  link_bytes_per_s: float
  usable_fraction: float = 1.0
  target_config: str = ""
  source: str = ""

  @property
  def usable_bytes(self) -> int:
    return int(self.memory_bytes * self.usable_fraction)


@dataclasses.dataclass(frozen=True)
class Target:
  """What `--target` names: a device model and how many, and how JAX's topology API spells it."""
  name: str
  device: DeviceSpec
  num_devices: int
  topology: str              # TPU: "v5e:2x2"; GPU: "slices x hosts x devices per host"
  num_slices: int = 1


def load_devices(path: str | None = None) -> dict[tuple[str, str], DeviceSpec]:
  """{(kind, model): DeviceSpec} from devices.toml."""
  path = path or os.path.join(TARGETS_DIR, "devices.toml")
  with open(path, "rb") as f:
    table = tomllib.load(f)
  out = {}
  fields = {f.name for f in dataclasses.fields(DeviceSpec)}
  for kind, models in table.items():
    for model, d in models.items():
      unknown = set(d) - fields
      if unknown:
        raise ValueError(f"{path}: [{kind}.{model}] has unknown keys {sorted(unknown)}")
      out[(kind, model)] = DeviceSpec(kind=kind, model=model, **d)
  return out


_GPU_RE = re.compile(r"^(\d+)x([A-Za-z0-9-]+)$")
_TPU_RE = re.compile(r"^(v\d+[a-z]*|tpu\d+[a-z]*):(\d+(?:x\d+){1,2})$")


def parse_target(name: str, num_slices: int = 1,
                 memory_fraction: float | None = None) -> Target:
  """`v5e:2x2`, `v4:2x2x1`, `8xH100`, ... -> Target; UsageError naming the known ones otherwise."""
  devices = load_devices()
  tpus = sorted(m for k, m in devices if k == "tpu")
  gpus = sorted(m for k, m in devices if k == "gpu")
  known = (f"TPU topologies {', '.join(t + ':AxB[xC]' for t in tpus)} or GPU servers "
           f"{', '.join('Nx' + g for g in gpus)}")
  if num_slices < 1:
    raise UsageError(f"--num_slices={num_slices}: must be >= 1")
  m = _TPU_RE.match(name)
  if m:
    model, dims = m.groups()
    if ("tpu", model) not in devices:
      raise UsageError(f"--target={name}: unknown TPU {model!r}; known: {known}")
    spec = devices[("tpu", model)]
    chips = math.prod(int(d) for d in dims.split("x"))
    return Target(name, spec, chips * num_slices, name, num_slices)
  m = _GPU_RE.match(name)
  if m:
    count, model = int(m.group(1)), m.group(2)
    if ("gpu", model) not in devices:
      raise UsageError(f"--target={name}: unknown GPU {model!r}; known: {known}")
    if count < 1 or (count > 8 and count % 8):
      raise UsageError(f"--target={name}: use 1 to 8 GPUs, or a multiple of 8 (8 per host)")
    if num_slices != 1:
      raise UsageError("--num_slices is for TPU targets; for more GPUs use a larger N")
    per_host = min(count, 8)
    spec = devices[("gpu", model)]
    if memory_fraction is not None:
      spec = dataclasses.replace(spec, usable_fraction=memory_fraction)
    return Target(name, spec, count, f"1x{count // per_host}x{per_host}")
  raise UsageError(f"--target={name!r} is neither a TPU topology nor a GPU server; use {known}")


def accelerator_type(target: Target) -> str:
  """TPU_ACCELERATOR_TYPE value libtpu expects for `target` (only silences its probing)."""
  model = target.device.model
  chips = target.num_devices // target.num_slices
  if target.device.kind != "tpu":
    return "v5litepod-4"
  if model == "v5e":
    return f"v5litepod-{chips}"
  if model in ("v4", "v5p"):
    return f"{model}-{2 * chips}"      # megacore: two cores per chip in the name
  return f"{model}-{chips}"


def target_devices(target: Target) -> list:
  """Compile-only devices of `target` (needs the AOT extras and JAX on the CPU)."""
  from jax.experimental import topologies
  if target.device.kind == "tpu":
    kwargs = {"num_slices": target.num_slices} if target.num_slices > 1 else {}
    topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology, **kwargs)
  else:
    with open(os.path.join(TARGETS_DIR, target.device.target_config)) as f:
      proto = f.read()
    topo = topologies.get_topology_desc(platform="cuda", target_config=proto,
                                        topology=target.topology)
  devices = list(topo.devices)
  if len(devices) != target.num_devices:
    raise UsageError(f"--target={target.name}: JAX made {len(devices)} devices, expected "
                     f"{target.num_devices}")
  return devices


# ==================================================================================================
# Reading a compiled program: memory, FLOPs, collectives.
# ==================================================================================================
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_SHAPE_RE = re.compile(r"\b(pred|[subfc]\d+|bf16|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
# `%name = TYPE op(operands), attrs`; async collectives appear as `op-start` / `op-done`.
_INSTR_RE = re.compile(
    r"^\s*(?:ROOT\s+)?%?(\S+)\s*=\s*(.+?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"collective-permute)(-start)?\((.*)$")
_OP_NAME_RE = re.compile(r'op_name="([^"]*)"')
_CHANNEL_RE = re.compile(r"\bchannel_id=(\d+)")
_FUSED_RS_RE = re.compile(r"^\s*(?:ROOT\s+)?%?(\S+)\s*=\s*(.+?)\s+fusion\((.*)calls=%?[\w.-]*"
                          r"(?:all-reduce-scatter|reduce-scatter)[\w.-]*")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of a compiled program (per-device view)."""
  kind: str
  name: str
  bytes: int            # the larger of its operands and results, per device
  shapes: str           # its result type as printed
  op_name: str          # JAX-level name from the metadata (which jitted op produced it)
  copies: int = 1       # instructions carrying it: libtpu clones one collective (same channel_id)
                        # into each fusion that reads it; it is one collective, counted once


def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE_RE.findall(text):
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += int(n * _DTYPE_BYTES.get(dtype, 4))
  return total


def _first_paren_group(text: str) -> str:
  depth = 0
  for i, ch in enumerate(text):
    if ch == "(":
      depth += 1
    elif ch == ")":
      if depth == 0:
        return text[:i]
      depth -= 1
  return text


def parse_collectives(hlo_text: str) -> list[Collective]:
  """Collectives of an optimised HLO module (`compiled.as_text()`), in program order.

  Async pairs count once (the `-start`); a TPU reduce-scatter that the compiler fused (a `fusion`
  calling `all-reduce-scatter`) counts as a reduce-scatter. Instructions of one kind that share a
  `channel_id` are one collective (libtpu clones a gather into every fusion that reads it: the
  ViT-B/32 step's 5 feature gathers appear as 204 all-gather instructions): the first stands for
  all, with `copies` = how many. Bytes are per device: the larger of what goes in and what comes
  out, once per collective.
  """
  out: list[Collective] = []
  seen: dict[tuple[str, str], int] = {}
  for line in hlo_text.splitlines():
    m = _INSTR_RE.match(line)
    if m:
      name, result, kind, start, rest = m.groups()
      operands = _first_paren_group(rest)
      res_bytes, in_bytes = _shape_bytes(result), _shape_bytes(operands)
      if start and kind in ("all-gather", "collective-permute", "all-to-all") and \
          result.lstrip().startswith("("):
        # `op-start` returns (operands, results): keep the results (the second half).
        arrays = [f"{t}[{d}]" for t, d in _SHAPE_RE.findall(result)]
        result = "(" + ", ".join(arrays[len(arrays) // 2:]) + ")"
        res_bytes = _shape_bytes(result)
      nbytes = max(res_bytes, in_bytes)
    else:
      m = _FUSED_RS_RE.match(line)
      if not m:
        continue
      name, result, rest = m.groups()
      kind, nbytes = "reduce-scatter", max(_shape_bytes(result), _shape_bytes(
          _first_paren_group(rest)))
    channel = _CHANNEL_RE.search(line)
    key = (kind, channel.group(1)) if channel else None
    if key in seen:
      first = out[seen[key]]
      out[seen[key]] = dataclasses.replace(first, copies=first.copies + 1)
      continue
    if key is not None:
      seen[key] = len(out)
    op = _OP_NAME_RE.search(line)
    out.append(Collective(kind, name, int(nbytes), result.strip(), op.group(1) if op else ""))
  return out


def collective_summary(collectives: Sequence[Collective]) -> dict[str, tuple[int, int]]:
  """{kind: (count, bytes)} over `COLLECTIVE_KINDS` (kinds absent from the program: (0, 0))."""
  summary = {k: (0, 0) for k in COLLECTIVE_KINDS}
  for c in collectives:
    n, b = summary[c.kind]
    summary[c.kind] = (n + 1, b + c.bytes)
  return summary


# What a collective of the train step is for (docs/aot.md "Collective structure").
FEATURE_GATHER = "feature gather"          # per-sample features -> every device (S, TPM-CL)
PARAMETER_GATHER = "parameter gather"      # FSDP: a sharded weight assembled for its layer
CLASS_TOKEN = "class-token rows"           # FSDP: last vision block's [N, 1, W] rows (see docs)
GRADIENT_REDUCTION = "gradient reduction"  # gradients summed over the batch shards
SCALAR_REDUCTION = "scalar reduction"      # global norms / finiteness over sharded leaves
UNEXPECTED = "unexpected"


def _result_dims(collective: Collective) -> list[tuple[int, ...]]:
  dims = []
  for _, d in _SHAPE_RE.findall(collective.shapes):
    dims.append(tuple(int(x) for x in d.split(",") if x) if d else ())
  return dims


def feature_shapes(batch_size: int, max_words: int, num_frames: int, embed_dim: int
                   ) -> list[tuple[int, ...]]:
  """Global shapes of the per-sample features the head gathers: sentence [B, D], words
  [B, L, D], text mask [B, L], frame tokens [B, F, D], frame mask [B, F]."""
  b, w, f, d = batch_size, max_words, num_frames, embed_dim
  return [(b, d), (b, w, d), (b, w), (b, f, d), (b, f)]


def _is_feature(dims: tuple[int, ...], features: Sequence[tuple[int, ...]]) -> bool:
  # A two-axis mesh may gather in a [B / k, k, ...] layout: merge the first two dimensions.
  merged = (dims[0] * dims[1],) + dims[2:] if len(dims) > 1 else dims
  return tuple(dims) in features or merged in features


def classify(collective: Collective, features: Sequence[tuple[int, ...]],
             param_shapes: Sequence[tuple[int, ...]]) -> str:
  """Role of one train-step collective, read from its shapes (the constants above).

  Feature gathers return one of the `feature_shapes` (also in a [B / k, k, ...] layout, which a
  two-axis mesh may gather in). Parameter gathers
  return as many elements as a parameter (the compiler may reshape or transpose it). Class-token
  rows are [N, 1, W] activations of the last vision block. Reductions are gradient reductions when
  most of their bytes are parameter-sized arrays, scalar reductions when they reduce scalars.
  """
  sizes = {math.prod(s) for s in param_shapes if len(s)}
  dims = _result_dims(collective)
  if not dims:
    return UNEXPECTED
  if collective.kind == "all-gather":
    if all(d and _is_feature(d, features) for d in dims):
      return FEATURE_GATHER
    if all(math.prod(d) in sizes for d in dims):
      return PARAMETER_GATHER
    if all(len(d) == 3 and d[1] == 1 for d in dims):
      return CLASS_TOKEN
    return UNEXPECTED
  if collective.kind in ("all-reduce", "reduce-scatter"):
    if all(d == () for d in dims):
      return SCALAR_REDUCTION
    in_params = sum(math.prod(d) for d in dims if d and math.prod(d) in sizes)
    total = sum(math.prod(d) for d in dims)
    # Combined reductions carry the metadata of one of their parts, so the op name is no guide.
    if 2 * in_params >= total:
      return GRADIENT_REDUCTION
    # XLA:GPU's combiner concatenates gradients into flat 1-D buffers (the tiny step's whole
    # gradient is one f32[3382016]); no other 1-D array of up to the parameters' size is reduced.
    if len(dims) == 1 and len(dims[0]) == 1 and dims[0][0] <= sum(math.prod(d) for d in
                                                                   param_shapes):
      return GRADIENT_REDUCTION
    if all(len(d) == 2 for d in dims):
      return CLASS_TOKEN     # partial sums of the class-token rows' matmuls (contraction over fsdp)
  return UNEXPECTED


def param_shapes_with_shards(params: Any) -> list[tuple[int, ...]]:
  """Every parameter's global shape and its per-device shard shape (for `classify`)."""
  import jax
  out = []
  for leaf in jax.tree.leaves(params):
    out.append(tuple(leaf.shape))
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None and hasattr(sharding, "shard_shape"):
      out.append(tuple(sharding.shard_shape(leaf.shape)))
  return out


@dataclasses.dataclass
class ProgramReport:
  """What one compiled program needs per device, read from XLA's own analyses."""
  name: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  flops: float | None        # per device; None where no cost analysis gave a count
  bytes_accessed: float      # per device
  flops_source: str          # FLOPS_COMPILED, FLOPS_PARTITIONED or "host-lowered/N"
  collectives: list[Collective]
  compile_seconds: float
  dtype: str = "float32"
  bytes_source: str = ""     # where bytes_accessed comes from when not flops_source (GPU: fused)
  flops_note: str = ""       # a correction applied to the count (gradient caching's loops)
  # train step: classify() per collective
  roles: list[str] = dataclasses.field(default_factory=list)

  @property
  def peak_bytes(self) -> int:
    """Arguments + outputs not aliased to (donated) arguments + temporaries + generated code."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes +
            self.code_bytes)


# Where a ProgramReport's FLOPs and bytes come from (docs/aot.md "FLOPs of GPU targets").
FLOPS_COMPILED = "compiled"              # the target compiler's own cost analysis (TPU)
FLOPS_PARTITIONED = "host-partitioned"   # the per-device module XLA:GPU partitioned, costed on host


def host_cost_analysis(hlo_module: Any) -> dict[str, float]:
  """XLA's HLO cost analysis of `hlo_module` (any backend's HLO) run by the host CPU client.

  The analysis counts each instruction by its shapes (2 x M x N x K for a dot), so it holds for
  a module that was lowered or partitioned for another backend.
  """
  from jax._src.lib import _jax    # JAX has no public entry taking an HloModule
  from jax.extend import backend
  cost = _jax.hlo_module_cost_analysis(backend.get_backend("cpu"), hlo_module)
  return {k: float(v) for k, v in cost.items() if isinstance(v, (int, float))}


def hlo_module_from_text(text: str) -> Any:
  """Parses HLO text (an XLA dump) into an HloModule."""
  from jax._src.lib import hlo     # private too: the parser JAX itself uses (through jax, so
  return hlo.hlo_module_from_text(text)   # jaxlib stays an indirect dependency)


def _first_cost(cost: Any) -> dict:
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  return dict(cost or {})


def analyse(name: str, lowered: Any, compiled: Any, num_devices: int, compile_seconds: float,
            dtype: str = "float32", partitioned_hlo: str | None = None) -> ProgramReport:
  """ProgramReport of a compiled program (memory_analysis, cost analysis, HLO collectives).

  FLOPs and bytes accessed come from the first source that has them: the compiled program's
  cost analysis (TPU); the host's cost analysis of `partitioned_hlo`, the per-device module
  after XLA:GPU's SPMD partitioner (`_compile` keeps it for GPU targets, whose compiled and
  lowered programs have no cost analysis without a device); else the host's cost analysis of
  the lowered, unpartitioned module divided by `num_devices` (exact on one device; on several it
  counts replicated work once, so it undercounts a device's share).
  """
  mem = compiled.memory_analysis()
  cost, source = _first_cost(compiled.cost_analysis()), FLOPS_COMPILED
  if not cost.get("flops") and partitioned_hlo is not None:
    cost, source = host_cost_analysis(hlo_module_from_text(partitioned_hlo)), FLOPS_PARTITIONED
  if not cost.get("flops"):
    cost = host_cost_analysis(lowered.compiler_ir("hlo").as_hlo_module())
    cost = {k: v / num_devices for k, v in cost.items()}
    source = f"host-lowered/{num_devices}"
  flops = float(cost["flops"]) if cost.get("flops") else None
  bytes_accessed, bytes_source = float(cost.get("bytes accessed", 0.0)), ""
  if source == FLOPS_PARTITIONED:
    # Memory traffic is a property of the fused program: cost the optimised GPU module (fusions
    # read their operands and write their outputs once). Its FLOPs are not usable (the GEMMs are
    # cuBLAS custom calls, counted as 0), so FLOPs stay the partitioned module's.
    try:
      fused = host_cost_analysis(hlo_module_from_text(compiled.as_text()))
    except Exception:   # noqa: BLE001 (a parser that rejects this module: keep the unfused count)
      fused = {}
    if fused.get("bytes accessed"):
      bytes_accessed, bytes_source = float(fused["bytes accessed"]), "the fused GPU program"
  return ProgramReport(
      name=name, argument_bytes=int(mem.argument_size_in_bytes),
      output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
      temp_bytes=int(mem.temp_size_in_bytes), code_bytes=int(mem.generated_code_size_in_bytes),
      flops=flops, bytes_accessed=bytes_accessed, bytes_source=bytes_source,
      flops_source=source if flops else "unavailable",
      collectives=parse_collectives(compiled.as_text()),
      compile_seconds=compile_seconds, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Roofline ESTIMATE of one call: each resource's time alone; the largest bounds the call."""
  compute_s: float
  memory_s: float
  network_s: float

  @property
  def step_s(self) -> float:
    return max(self.compute_s, self.memory_s, self.network_s)

  @property
  def bound(self) -> str:
    return max((self.compute_s, "compute"), (self.memory_s, "memory"),
               (self.network_s, "interconnect"))[1]


def estimate(report: ProgramReport, device: DeviceSpec) -> Estimate | None:
  """FLOPs over peak, bytes accessed over HBM bandwidth, collective bytes over the link.

  None when the program has no FLOP count.
  """
  if report.flops is None:
    return None
  peak = device.bf16_flops if report.dtype == "bfloat16" else device.fp32_flops
  net = sum(c.bytes for c in report.collectives)
  return Estimate(report.flops / peak, report.bytes_accessed / device.hbm_bytes_per_s,
                  net / device.link_bytes_per_s if device.link_bytes_per_s else 0.0)


# ==================================================================================================
# The programs of a run, compiled for the target.
# ==================================================================================================
class DoesNotFit(Exception):
  """The compiler refused the program for lack of device memory (TPU: RESOURCE_EXHAUSTED)."""


# XLA:GPU dumps the module its SPMD partitioner made (one device's program, before fusion and
# GEMM rewriting) under this name when `xla_dump_to` is set.
_PARTITIONED_DUMP_SUFFIX = ".after_spmd_partitioner.txt"


def _is_gpu(device: Any) -> bool:
  return device.platform in ("gpu", "cuda", "rocm")


def _compile(lowered: Any, gpu: bool = False) -> tuple[Any, str | None]:
  """Compiles `lowered`: (compiled, the partitioned per-device HLO text for GPU, else None).

  For GPU targets the compile dumps into a temporary folder, from which only the partitioned
  module is kept (for `analyse`: XLA:GPU has no cost analysis without a device). Raises
  DoesNotFit when the compiler refuses the program for lack of memory.
  """
  import jax
  try:
    if not gpu:
      return lowered.compile(), None
    with tempfile.TemporaryDirectory(prefix="tvr_jax_aot_") as folder:
      compiled = lowered.compile(compiler_options={
          "xla_dump_to": folder, "xla_dump_hlo_as_text": True, "xla_gpu_dump_llvmir": False})
      dumps = glob.glob(os.path.join(folder, "*" + _PARTITIONED_DUMP_SUFFIX))
      text = None
      if len(dumps) == 1:     # else (another XLA's dump layout) analyse falls back
        with open(dumps[0]) as f:
          text = f.read()
      return compiled, text
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" in str(e):
      raise DoesNotFit(str(e).splitlines()[0]) from e
    raise


def prepare_config(config: Any) -> list[str]:
  """Makes `config` compilable without files; returns notes for the user.

  Weights are never read: sizes come from `config.init_from`'s `clip_config.json` when that
  directory exists, otherwise from `config.clip_preset`.
  """
  notes = []
  if config.init_from and not os.path.isdir(config.init_from):
    notes.append(f"config.init_from={config.init_from!r} not found: CLIP sizes from "
                 f"config.clip_preset={config.clip_preset!r}")
    config.init_from = ""
  return notes


def abstract_batch(config: Any, mesh: Any, batch_size: int, *, train: bool = True) -> dict:
  """ShapeDtypeStructs of one global batch as the input pipeline delivers it, batch-sharded."""
  import jax
  import jax.numpy as jnp
  from tvr_jax import sharding
  s = sharding.batch_sharding(mesh)
  b, f, r, w = batch_size, config.num_frames, config.image_size, config.max_words
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=s)  # noqa: E731
  batch = {"frames": sds((b, f, r, r, 3), jnp.uint8), "frame_mask": sds((b, f), jnp.int32),
           "text_ids": sds((b, w), jnp.int32)}
  if train:
    batch.update(video_index=sds((b,), jnp.int32), caption_index=sds((b,), jnp.int32))
    if config.model.keyword_weighting:
      batch["keyword_mask"] = sds((b, w), jnp.int32)
  return batch


def compile_train_step(config: Any, mesh: Any, batch_size: int | None = None, *,
                       gpu_flops: bool = True) -> ProgramReport:
  """Compiles the trainer's own step for `mesh`'s devices; DoesNotFit if the compiler refuses.

  `gpu_flops=False` skips the XLA dump a GPU target's per-device FLOP count comes from (a
  batch search needs only memory); its FLOPs are then the lowered module's over the devices.
  """
  from tvr_jax import sharding
  from tvr_jax import train
  batch_size = batch_size or config.batch_size
  sharding.check_batch_size(batch_size, mesh)
  state, setup = train.abstract_train_state(config, mesh, total_steps=1000)
  step = train.train_step_for(config, setup, mesh)
  t0 = time.perf_counter()
  batch = abstract_batch(config, mesh, batch_size)
  lowered = step.lower(state, batch)
  compiled, partitioned = _compile(lowered, gpu_flops and _is_gpu(mesh.devices.flat[0]))
  accum = (f", accum_steps {config.accum_steps}: micro-batches of "
           f"{batch_size // config.accum_steps}" if config.accum_steps > 1 else "")
  report = analyse(f"train step (global batch {batch_size}{accum})", lowered, compiled, mesh.size,
                   time.perf_counter() - t0, config.dtype, partitioned)
  k = config.accum_steps
  if k > 1 and report.flops:
    # XLA's cost analysis counts a loop body once, so gradient caching's two micro-batch loops
    # count 1/k of their work. The same step with the loops unrolled is lowered (not compiled)
    # and both lowerings are costed on the host; their ratio scales the per-device count.
    unrolled = train.train_step_for(config, setup, mesh, unroll_microbatches=True).lower(
        state, batch)
    rolled_cost = host_cost_analysis(lowered.compiler_ir("hlo").as_hlo_module())
    unrolled_cost = host_cost_analysis(unrolled.compiler_ir("hlo").as_hlo_module())
    scale = unrolled_cost["flops"] / rolled_cost["flops"]
    report.flops *= scale
    report.bytes_accessed *= unrolled_cost.get("bytes accessed", 1.0) / rolled_cost.get(
        "bytes accessed", 1.0)
    report.flops_note = f"x{scale:.2f} for the {k} micro-batch loops, counted unrolled"
  shapes = param_shapes_with_shards(state["params"])
  embed_dim = state["params"]["clip"]["text_projection"].shape[-1]
  features = feature_shapes(batch_size, config.max_words, config.num_frames, embed_dim)
  report.roles = [classify(c, features, shapes) for c in report.collectives]
  return report


def compile_encoders(config: Any, mesh: Any) -> list[ProgramReport]:
  """Compiles the evaluation encoders (video, text) at `config.eval_batch_size`."""
  from tvr_jax import evaluate
  from tvr_jax import sharding
  from tvr_jax import train
  state, setup = train.abstract_train_state(config, mesh, total_steps=1000)
  n = sharding.data_parallel_size(mesh)
  batch_size = -(-config.eval_batch_size // n) * n
  batch = abstract_batch(config, mesh, batch_size, train=False)
  encode_video, encode_text = evaluate.make_encoders(setup.graphdef, mesh)
  rest = state.get("rest")
  reports = []
  for name, fn, args in (
      (f"encode videos (batch {batch_size})", encode_video,
       (state["params"], rest, batch["frames"], batch["frame_mask"])),
      (f"encode captions (batch {batch_size})", encode_text,
       (state["params"], rest, batch["text_ids"]))):
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    compiled, partitioned = _compile(lowered, _is_gpu(mesh.devices.flat[0]))
    reports.append(analyse(name, lowered, compiled, mesh.size, time.perf_counter() - t0,
                           config.dtype, partitioned))
  return reports


def compile_scorer(config: Any, device: Any, num_videos: int = 1000,
                   num_texts: int = 100_000) -> ProgramReport:
  """Compiles one block of the chunked DMAE scorer on one target device.

  Block sizes come from `config.score_budget_mb` as the scorer's first estimate makes them;
  the scorer runs on one device per process.
  """
  import jax
  from tvr_jax import scoring
  from tvr_jax.models import build as build_lib
  from tvr_jax.models import clip as clip_lib
  clip_cfg = clip_lib.CLIPConfig.preset(config.clip_preset) if not config.init_from else \
      build_lib.clip_config(config)
  dim = clip_cfg.embed_dim
  words, tokens = (num_texts, config.max_words, dim), (num_videos, config.num_frames, dim)
  budget = int(config.score_budget_mb) << 20
  ct, cv = scoring.estimate_chunks(num_texts, num_videos, config.max_words, config.num_frames, dim,
                                   budget)
  switches = build_lib.retrieval_config(config).similarity_kwargs()
  scorer = scoring.ChunkedScorer(budget, textual_attention=switches["textual_attention"],
                                 visual_attention=switches["visual_attention"],
                                 show_progress=False)
  t0 = time.perf_counter()
  lowered = scorer.lower(ct, cv, words, tokens, sharding=jax.sharding.SingleDeviceSharding(device))
  compiled, partitioned = _compile(lowered, _is_gpu(device))
  return analyse(f"score block ({ct} captions x {cv} videos)", lowered, compiled, 1,
                 time.perf_counter() - t0, "float32", partitioned)


def fits(report: ProgramReport, device: DeviceSpec) -> bool:
  """Whether the program's peak memory fits what a process may use on one device."""
  return report.peak_bytes <= device.usable_bytes


# ==================================================================================================
# Printing.
# ==================================================================================================
def _gib(n: float) -> str:
  return f"{n / GIB:.2f}"


def format_report(report: ProgramReport, target: Target, *, details: bool = False) -> list[str]:
  """Lines describing one compiled program per device, with the ESTIMATE labelled as such."""
  d = target.device
  est = estimate(report, d)
  usable = d.usable_bytes
  lines = [
      f"{report.name}: compiled in {report.compile_seconds:.1f} s",
      f"  memory per device (GiB): arguments {_gib(report.argument_bytes)}, outputs "
      f"{_gib(report.output_bytes)} (aliased to donated arguments {_gib(report.alias_bytes)}), "
      f"temporaries {_gib(report.temp_bytes)}, code {_gib(report.code_bytes)}; peak "
      f"{_gib(report.peak_bytes)} of {_gib(usable)} usable "
      f"({100 * report.peak_bytes / usable:.0f}%)",
      (f"  FLOPs per device: {report.flops / 1e12:.3f} TFLOP ({report.flops_source} cost "
       f"analysis{'; ' + report.flops_note if report.flops_note else ''}), bytes accessed "
       f"{report.bytes_accessed / GIB:.2f} GiB"
       + (f" ({report.bytes_source})" if report.bytes_source else "")
       if report.flops is not None else
       "  FLOPs per device: not available (no cost analysis gave a count)")]
  summary = collective_summary(report.collectives)
  parts = [f"{k} {n} ({b / 2 ** 20:.1f} MiB)" for k, (n, b) in summary.items() if n]
  clones = sum(c.copies for c in report.collectives) - len(report.collectives)
  note = (f" [+{clones} cloned instructions: the compiler copied some collectives into each "
          f"fusion that reads them; counted once]" if clones else "")
  lines.append(f"  collectives per device: {', '.join(parts) if parts else 'none'}{note}")
  if report.roles:
    roles: dict[str, list[int]] = {}
    for c, role in zip(report.collectives, report.roles):
      n_b = roles.setdefault(role, [0, 0])
      n_b[0] += 1
      n_b[1] += c.bytes
    lines.append("  collectives by role: " + ", ".join(
        f"{role} {n} ({b / 2 ** 20:.1f} MiB)" for role, (n, b) in roles.items()))
  peak = d.bf16_flops if report.dtype == "bfloat16" else d.fp32_flops
  if est is None:
    lines.append("  ESTIMATE: none (no FLOP count for this target)")
  else:
    mfu = report.flops / peak / est.step_s if est.step_s > 0 else 0.0
    lines.append(
        f"  ESTIMATE (roofline, not a measurement): {est.step_s * 1e3:.1f} ms per call, "
        f"{est.bound}-bound (compute {est.compute_s * 1e3:.1f} ms at {peak / 1e12:.0f} TFLOP/s "
        f"{report.dtype}, memory {est.memory_s * 1e3:.1f} ms at {d.hbm_bytes_per_s / 1e9:.0f} "
        f"GB/s, interconnect {est.network_s * 1e3:.1f} ms at {d.link_bytes_per_s / 1e9:.0f} "
        f"GB/s); MFU at that time {100 * mfu:.0f}% (an upper bound: overlap is assumed perfect)")
  if details:
    roles = report.roles or [""] * len(report.collectives)
    for c, role in zip(report.collectives, roles):
      copies = f" x{c.copies}" if c.copies > 1 else ""
      lines.append(f"    {c.kind:18s} {role:18s} {c.bytes / 2 ** 20:9.2f} MiB  {c.shapes[:56]:56s} "
                   f"{c.op_name[-90:]}{copies}")
  return lines


def _target_line(target: Target, mesh: Any) -> str:
  d = target.device
  mem = f"{_gib(d.memory_bytes)} GiB"
  if d.usable_fraction < 1:
    mem += f" ({d.usable_fraction:.0%} usable by default: {_gib(d.usable_bytes)} GiB)"
  slices = f", {target.num_slices} slices" if target.num_slices > 1 else ""
  return (f"target {target.name}: {target.num_devices} x {d.model}{slices}, {mem} each; "
          f"mesh {dict(mesh.shape)}")


# ==================================================================================================
# The command.
# ==================================================================================================
def _make_mesh(config: Any, devices: list) -> Any:
  from tvr_jax import sharding
  try:
    return sharding.make_mesh(config.mesh.to_dict(), devices)
  except ValueError as e:
    raise UsageError(str(e)) from e


def _with(config: Any, **changes) -> Any:
  c = config.copy_and_resolve_references()
  for k, v in changes.items():
    setattr(c, k, v)
  return c


def batch_unit(config: Any, mesh: Any) -> int:
  """The step a global batch comes in: the data-parallel shards x `config.accum_steps` (each
  micro-batch of gradient caching is split over every shard)."""
  from tvr_jax import sharding
  return sharding.data_parallel_size(mesh) * config.accum_steps


def find_max_batch(config: Any, mesh: Any, target: Target, limit: int = 8192,
                   say=print) -> int:
  """Largest global batch B <= `limit`, a multiple of `batch_unit`, whose train step fits.

  Returns 0 when one unit does not fit. Doubles from one unit until a compile does not fit (or
  passes `limit`), then bisects between the last fitting and the first failing batch: about
  2 log2(B / unit) compiles. Assumes that memory grows with the batch. When B + unit > `limit`,
  larger batches were not tried.
  """
  unit = batch_unit(config, mesh)
  if limit < unit:
    raise ValueError(f"find_max_batch: limit={limit} is below one batch unit ({unit}: the "
                     f"data-parallel shards x config.accum_steps)")

  def ok(b):
    try:
      r = compile_train_step(config, mesh, b, gpu_flops=False)
    except DoesNotFit:
      say(f"    batch {b}: does not fit (compiler)")
      return False
    good = fits(r, target.device)
    say(f"    batch {b}: peak {_gib(r.peak_bytes)} GiB, {'fits' if good else 'does not fit'} "
        f"({r.compile_seconds:.0f} s)")
    return good
  # Invariant: lo fits (0: nothing known to fit); hi does not fit, or is past the limit.
  lo, hi = 0, unit
  while hi <= limit and ok(hi):
    lo, hi = hi, hi * 2
  if lo == 0:
    return 0
  hi = min(hi, limit // unit * unit + unit)
  while hi - lo > unit:
    mid = (lo + hi) // 2 // unit * unit     # a multiple of unit strictly between lo and hi
    lo, hi = (mid, hi) if ok(mid) else (lo, mid)
  return lo


def run(config: Any, target: Target, *, programs: Sequence[str] = ("train", "eval", "score"),
        max_batch: bool = False, max_batch_limit: int = 8192, details: bool = False,
        say=print) -> tuple[int, list[ProgramReport]]:
  """Compiles `programs` for `target`, prints the report and the verdict.

  Returns (exit status, the ProgramReports): EXIT_FITS or EXIT_DOES_NOT_FIT. `max_batch` adds
  the `find_max_batch` search (batches up to `max_batch_limit`) for float32 / bfloat16 x remat
  off / on.
  """
  for note in prepare_config(config):
    say(f"note: {note}")
  devices = target_devices(target)
  mesh = _make_mesh(config, devices)
  if max_batch and max_batch_limit < batch_unit(config, mesh):
    raise UsageError(f"--max_batch_limit={max_batch_limit}: below one batch unit "
                     f"({batch_unit(config, mesh)}: the data-parallel shards x "
                     f"config.accum_steps)")
  say(_target_line(target, mesh))
  say(f"recipe: {config.dataset}, CLIP {config.init_from or config.clip_preset}, global batch "
      f"{config.batch_size} x {config.num_frames} frames x {config.image_size} px, "
      f"{config.max_words} tokens, {config.dtype}, remat {'on' if config.remat else 'off'}")
  problems, reports = [], []
  builders = {"train": lambda: [compile_train_step(config, mesh)],
              "eval": lambda: compile_encoders(config, mesh),
              "score": lambda: [compile_scorer(config, devices[0])]}
  for what in programs:
    try:
      new = builders[what]()
    except DoesNotFit as e:
      say(f"{what}: the compiler refused it: {e}")
      problems.append(f"{what} ({e})")
      continue
    for r in new:
      reports.append(r)
      for line in format_report(r, target, details=details):
        say(line)
      if not fits(r, target.device):
        problems.append(f"{r.name} needs {_gib(r.peak_bytes)} GiB per device, over "
                        f"{_gib(target.device.usable_bytes)}")
  if max_batch:
    say("largest global batch that fits (compiled; doubling, then bisection):")
    for dtype in ("float32", "bfloat16"):
      for remat in (False, True):
        c = _with(config, dtype=dtype, remat=remat)
        best = find_max_batch(c, mesh, target, limit=max_batch_limit, say=say)
        capped = " (the search limit; larger not tried)" if best and \
            best + batch_unit(c, mesh) > max_batch_limit else ""
        say(f"  {dtype}, remat {'on' if remat else 'off'}: largest batch {best}{capped}")
  train_reports = [r for r in reports if r.name.startswith("train")]
  if problems:
    say("does not fit: " + "; ".join(problems) + f" [{target.name}]")
    return EXIT_DOES_NOT_FIT, reports
  peak = max((r.peak_bytes for r in reports), default=0)
  extra = ""
  est = estimate(train_reports[0], target.device) if train_reports else None
  if est is not None:
    extra = f", estimated train step {est.step_s * 1e3:.0f} ms ({est.bound}-bound, an estimate)"
  say(f"fits: every program on {target.name}, peak {_gib(peak)} of "
      f"{_gib(target.device.usable_bytes)} GiB per device{extra}")
  return EXIT_FITS, reports


def main(argv: Sequence[str] | None = None) -> int:
  """Parses flags (re-executing with the AOT extras first) and runs; returns the exit status."""
  argv = list(sys.argv if argv is None else argv)
  if not os.environ.get(_CHILD_ENV):
    missing = missing_extras()
    if missing:
      print(f"error: the ahead-of-time compilation extras are not installed in {extras_dir()} "
            f"(missing {', '.join(missing)}); install them with `{INSTALL_COMMAND}` "
            f"(requirements-aot.txt), or point ${EXTRAS_ENV} at a folder holding them",
            file=sys.stderr)
      return EXIT_USAGE
    target_name = next((a.split("=", 1)[1] for a in argv if a.startswith("--target=")), "")
    try:
      acc = accelerator_type(parse_target(target_name)) if target_name else "v5litepod-4"
    except UsageError:
      acc = "v5litepod-4"   # the child reports the bad target
    os.execve(sys.executable, [sys.executable, "-m", "tvr_jax.aot", *argv[1:]],
              compile_env(accelerator_type=acc))
  return _child_main(argv)


def _child_main(argv: list[str]) -> int:
  from absl import flags
  from ml_collections import config_flags
  fl = flags.FlagValues()
  config_flag = config_flags.DEFINE_config_file("config", None, "Run config file.", flag_values=fl)
  target = flags.DEFINE_string("target", None, "v5e:2x2, v4:2x2x1, 8xH100, ...", flag_values=fl)
  num_slices = flags.DEFINE_integer("num_slices", 1, "TPU slices (multi-slice).", flag_values=fl)
  what = flags.DEFINE_list("programs", ["train", "eval", "score"],
                           "Programs to compile: train, eval, score.", flag_values=fl)
  max_batch = flags.DEFINE_bool("max_batch", False, "Also find the largest global batch that fits "
                                "(float32/bfloat16 x remat off/on).", flag_values=fl)
  max_batch_limit = flags.DEFINE_integer("max_batch_limit", 8192, "--max_batch tries no global "
                                         "batch above this.", flag_values=fl)
  details = flags.DEFINE_bool("collectives", False, "List every collective (role, bytes, shape, "
                              "the JAX op that made it).",
                              flag_values=fl)
  fraction = flags.DEFINE_float("memory_fraction", None, "GPU: share of device memory a process "
                                "may use (default 0.75, JAX's preallocation).", flag_values=fl)
  from tvr_jax import train
  try:
    fl(argv)
    if not config_flag.value or not target.value:
      raise UsageError("--config and --target are required, e.g. --config=configs/msrvtt.py "
                       "--target=v5e:2x2")
    unknown = set(what.value) - {"train", "eval", "score"}
    if unknown:
      raise UsageError(f"--programs: unknown {sorted(unknown)}; use train, eval, score")
    tgt = parse_target(target.value, num_slices.value, fraction.value)
    config = config_flag.value
    train.validate_config(config)
    return run(config, tgt, programs=what.value, max_batch=max_batch.value,
               max_batch_limit=max_batch_limit.value, details=details.value)[0]
  except (UsageError, flags.Error, train.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
  sys.exit(main())
