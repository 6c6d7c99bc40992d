"""Safe readers of PyTorch checkpoint files into numpy state dicts; no code is ever executed.

Supported inputs (`read_checkpoint` detects which):
- PyTorch zip files (`torch.save`, `.pt`/`.bin`/`.pth`): `ARCHIVE/data.pkl` + `ARCHIVE/data/N`.
- TorchScript archives (OpenAI's released `ViT-B-32.pt`): `ARCHIVE/data.pkl` pickles the module
  tree as `__torch__.*` objects; `ARCHIVE/code/` declares each class's `__parameters__` and
  `__buffers__`. Classes become inert placeholder objects; the state dict is rebuilt from the
  declarations (read as text, never run). `torch.jit.load` is never used: it runs the archive's
  code.
- Legacy (pre-1.6, non-zip) `torch.save` pickles.
- `.safetensors` files (through `safetensors.numpy`).
- Hugging Face model directories (`config.json` + `model.safetensors` / `pytorch_model.bin`, or
  their sharded `*.index.json` forms).

Every pickle is read with `RestrictedUnpickler`, whose `find_class` admits only tensor/storage
rebuild functions, `collections.OrderedDict` and (TorchScript only) `__torch__.*` placeholders;
anything else (e.g. `os.system` in a hostile `__reduce__`) raises `UnsafePickleError` before it
could be called. torch is not imported.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import pickle
import re
import zipfile
import zlib
from typing import Any, Callable

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class CheckpointError(ValueError):
  """A checkpoint file is unreadable, malformed or does not match what is expected."""


class UnsafePickleError(CheckpointError):
  """A pickle asks for a global that is not on the allow list (it may try to run code)."""


@dataclasses.dataclass
class Checkpoint:
  """A state dict read from disk.

  Attributes:
    path: the file or directory read.
    format: "torchscript", "torch-zip", "torch-legacy", "safetensors" or "hf-directory".
    tensors: state-dict key -> numpy array (original dtype, e.g. float16 for OpenAI's archives).
    hf_config: `config.json` of a Hugging Face directory, else None.
    weights_format: for "hf-directory", the format of its weight files.
  """
  path: str
  format: str
  tensors: dict[str, np.ndarray]
  hf_config: dict[str, Any] | None = None
  weights_format: str | None = None


# ----------------------------------------------------------------------------------------------
# Restricted unpickling.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(_STORAGE_DTYPES[self.name])


@dataclasses.dataclass
class _StorageRef:
  """A storage named in a pickle's persistent id; its bytes are fetched after unpickling."""
  key: str
  storage_type: _StorageType
  numel: int
  view: tuple[str, int, int] | None = None  # legacy views: (view_key, offset, size)


@dataclasses.dataclass
class _TensorRef:
  storage: _StorageRef
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _StorageRef):
    raise CheckpointError(f"tensor rebuild got {type(storage).__name__} instead of a storage")
  return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size),
                    tuple(int(s) for s in stride))


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


class TorchScriptObject:
  """Inert stand-in for a `__torch__.*` class in a TorchScript archive: it only stores its state."""
  qualname = "__torch__"

  def __init__(self, *args):
    del args
    self.state: Any = None

  def __setstate__(self, state):
    self.state = state

  def __repr__(self):
    return f"<{self.qualname}>"


_PLACEHOLDERS: dict[str, type] = {}


def _placeholder_class(module: str, name: str) -> type:
  qual = f"{module}.{name}"
  if qual not in _PLACEHOLDERS:
    _PLACEHOLDERS[qual] = type(name, (TorchScriptObject,), {"qualname": qual})
  return _PLACEHOLDERS[qual]


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # TorchScript's typed containers.
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
    ("torch.jit._pickle", "restore_type_tag"): lambda value, type_str: value,
}


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only allow-listed globals; storages become `_StorageRef`s.

  Args:
    file: binary file object positioned at a pickle.
    source: file name used in error messages.
    torchscript: also admit `__torch__.*` classes (as inert `TorchScriptObject` placeholders).
  """

  def __init__(self, file, *, source: str, torchscript: bool = False):
    super().__init__(file)
    self.source = source
    self.torchscript = torchscript

  def find_class(self, module: str, name: str):
    if (module, name) in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if self.torchscript and (module == "__torch__" or module.startswith("__torch__.")):
      return _placeholder_class(module, name)
    raise UnsafePickleError(
        f"{self.source}: refusing to unpickle global '{module}.{name}': only tensors, storages "
        f"and plain containers are allowed (the file may try to execute code; nothing was run)")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      raise CheckpointError(f"{self.source}: unsupported persistent id {str(pid)[:80]}")
    storage_type = pid[1]
    if not isinstance(storage_type, _StorageType):
      raise CheckpointError(f"{self.source}: unsupported storage type {storage_type!r}")
    if len(pid) == 5:  # zip format: (storage, type, key, location, numel)
      return _StorageRef(str(pid[2]), storage_type, int(pid[4]))
    if len(pid) == 6:  # legacy: (storage, type, root_key, location, numel, view_metadata)
      view = None if pid[5] is None else (str(pid[5][0]), int(pid[5][1]), int(pid[5][2]))
      return _StorageRef(str(pid[2]), storage_type, int(pid[4]), view)
    raise CheckpointError(f"{self.source}: malformed storage id {str(pid)[:80]}")


def _unpickle(data: bytes | io.BufferedIOBase, source: str, torchscript: bool = False) -> Any:
  file = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
  try:
    return RestrictedUnpickler(file, source=source, torchscript=torchscript).load()
  except CheckpointError:
    raise
  except Exception as e:  # truncated / corrupt pickles raise many kinds of errors
    raise CheckpointError(f"{source}: corrupt or truncated pickle ({type(e).__name__}: {e})") from e


def _materialise(obj: Any, get_storage: Callable[[_StorageRef], np.ndarray], source: str) -> Any:
  """Replaces every `_TensorRef` inside dicts/lists/tuples/placeholders by a numpy array."""
  if isinstance(obj, _TensorRef):
    return _tensor_from_storage(obj, get_storage(obj.storage), source)
  if isinstance(obj, dict):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _materialise(v, get_storage, source)
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v, get_storage, source) for v in obj)
  if isinstance(obj, TorchScriptObject):
    obj.state = _materialise(obj.state, get_storage, source)
    return obj
  return obj


def _tensor_from_storage(ref: _TensorRef, storage: np.ndarray, source: str) -> np.ndarray:
  """Copies the strided view `ref` out of a 1-D storage array, checking every bound first."""
  size, stride, offset = ref.size, ref.stride, ref.offset
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise CheckpointError(f"{source}: malformed tensor (size {size}, stride {stride})")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if offset < 0 or last >= storage.size:
    raise CheckpointError(f"{source}: tensor of size {size} reaches element {last} of a storage "
                          f"with {storage.size} elements (truncated or corrupt file)")
  item = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                         strides=[s * item for s in stride], writeable=False)
  return np.array(view, copy=True)


def _storage_array(raw: bytes, ref: _StorageRef, source: str, name: str,
                   byteorder: str = "little") -> np.ndarray:
  dtype = ref.storage_type.dtype
  if byteorder == "big":
    dtype = dtype.newbyteorder(">")
  if len(raw) < ref.numel * dtype.itemsize:
    raise CheckpointError(f"{source}: storage {name} has {len(raw)} bytes, expected "
                          f"{ref.numel * dtype.itemsize} (truncated file)")
  return np.frombuffer(raw, dtype, count=ref.numel).astype(dtype.newbyteorder("="), copy=False)


# ----------------------------------------------------------------------------------------------
# Zip archives: torch.save and TorchScript.
# ----------------------------------------------------------------------------------------------

def _zip_prefix(names: list[str], source: str) -> str:
  pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pkls) != 1:
    raise CheckpointError(f"{source}: zip file is not a PyTorch checkpoint (no single "
                          f"ARCHIVE/data.pkl entry)")
  return pkls[0][: -len("data.pkl")]


def _read_zip(path: str) -> Checkpoint:
  try:
    zf = zipfile.ZipFile(path)
    names = zf.namelist()
  except (zipfile.BadZipFile, OSError) as e:
    raise CheckpointError(f"{path}: not a readable zip archive ({e})") from e
  with zf:
    prefix = _zip_prefix(names, path)
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = zf.read(prefix + "byteorder").decode().strip()
    torchscript = any(n.startswith(prefix + "code/") for n in names)
    cache: dict[str, np.ndarray] = {}

    def get_storage(ref: _StorageRef) -> np.ndarray:
      name = f"{prefix}data/{ref.key}"
      if name not in cache:  # storages shared by several tensors are read once
        try:
          raw = zf.read(name)
        except KeyError as e:
          raise CheckpointError(f"{path}: storage entry {name} is missing") from e
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
          raise CheckpointError(f"{path}: cannot read {name} ({e}); truncated file?") from e
        cache[name] = _storage_array(raw, ref, path, name, byteorder)
      return cache[name]

    def read(name: str) -> bytes:
      try:
        return zf.read(name)
      except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise CheckpointError(f"{path}: cannot read {name} ({e}); truncated file?") from e

    root = _unpickle(read(prefix + "data.pkl"), f"{path}:{prefix}data.pkl", torchscript)
    root = _materialise(root, get_storage, path)
    if not torchscript:
      return Checkpoint(path, "torch-zip", _state_dict_from_object(root, path))
    declarations = _torchscript_declarations(
        {n: read(n).decode("utf-8", "replace") for n in names
         if n.startswith(prefix + "code/") and n.endswith(".py")}, prefix + "code/")
    tensors: dict[str, np.ndarray] = {}
    _walk_torchscript(root, "", declarations, tensors, path)
    return Checkpoint(path, "torchscript", tensors)


_CLASS_RE = re.compile(r"^class (\w+)\(Module\):\s*$", re.M)
_LIST_RE = r"^\s+{}\s*=\s*\[([^\]]*)\]"


def _torchscript_declarations(code: dict[str, str], code_root: str) -> dict[str, tuple[list, list]]:
  """Class qualname -> (parameter names, buffer names), from the archive's code/ text (not run)."""
  decls = {}
  for name, text in code.items():
    module = name[len(code_root):-len(".py")].replace("/", ".")
    starts = [(m.start(), m.group(1)) for m in _CLASS_RE.finditer(text)] + [(len(text), None)]
    for (start, cls), (end, _) in zip(starts, starts[1:]):
      body = text[start:end]
      lists = []
      for field in ("__parameters__", "__buffers__"):
        m = re.search(_LIST_RE.format(field), body, re.M)
        lists.append(re.findall(r'"([^"]+)"', m.group(1)) if m else [])
      decls[f"{module}.{cls}"] = tuple(lists)
  return decls


def _walk_torchscript(obj: TorchScriptObject, prefix: str, decls, out: dict, source: str):
  """Collects declared parameters/buffers of `obj` and its submodules into `out` by state key."""
  if obj.qualname not in decls:
    raise CheckpointError(f"{source}: TorchScript class {obj.qualname} has no declaration in the "
                          f"archive's code/ folder")
  params, buffers = decls[obj.qualname]
  state = obj.state if isinstance(obj.state, dict) else {}
  for name in params + buffers:
    value = state.get(name)
    if value is None:  # optional parameter (e.g. bias=None)
      continue
    if not isinstance(value, np.ndarray):
      raise CheckpointError(f"{source}: {prefix}{name} is declared a parameter/buffer but holds "
                            f"{type(value).__name__}")
    out[prefix + name] = value
  for name, value in state.items():
    if isinstance(value, TorchScriptObject):
      _walk_torchscript(value, f"{prefix}{name}.", decls, out, source)


def _state_dict_from_object(obj: Any, source: str) -> dict[str, np.ndarray]:
  """A flat {key: array} from a torch.save'd object: a state dict, or {"state_dict": ...}."""
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict) or not obj:
    raise CheckpointError(f"{source}: expected a state dict (mapping of names to tensors), got "
                          f"{type(obj).__name__}")
  bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise CheckpointError(f"{source}: entry {bad[0]!r} is {type(obj[bad[0]]).__name__}, not a "
                          f"tensor")
  keys = list(obj)
  if all(k.startswith("module.") for k in keys):  # saved from DistributedDataParallel
    return {k[len("module."):]: v for k, v in obj.items()}
  return dict(obj)


# ----------------------------------------------------------------------------------------------
# Legacy (non-zip) torch.save files.
# ----------------------------------------------------------------------------------------------

def _read_legacy(path: str) -> Checkpoint:
  with open(path, "rb") as f:
    magic = _unpickle(f, path)
    if magic != _LEGACY_MAGIC:
      raise CheckpointError(f"{path}: not a PyTorch checkpoint (pickle without torch's magic "
                            f"number)")
    _unpickle(f, path)  # protocol version
    _unpickle(f, path)  # sys info
    root = _unpickle(f, path)
    keys = _unpickle(f, path)
    refs: dict[str, _StorageRef] = {}

    def collect(o):
      if isinstance(o, _TensorRef):
        refs[o.storage.key] = o.storage
      elif isinstance(o, dict):
        for v in o.values():
          collect(v)
      elif isinstance(o, (list, tuple)):
        for v in o:
          collect(v)
    collect(root)
    raw: dict[str, np.ndarray] = {}
    for key in keys:
      header = f.read(8)
      if len(header) != 8 or key not in refs:
        raise CheckpointError(f"{path}: storage {key} missing or truncated")
      ref = refs[key]
      numel = int.from_bytes(header, "little")
      data = f.read(numel * ref.storage_type.dtype.itemsize)
      raw[key] = _storage_array(data, dataclasses.replace(ref, numel=numel), path, key)

  def get(ref: _StorageRef) -> np.ndarray:
    if ref.key not in raw:
      raise CheckpointError(f"{path}: storage {ref.key} missing")
    arr = raw[ref.key]
    if ref.view is not None:
      _, off, size = ref.view
      arr = arr[off:off + size]
    return arr
  return Checkpoint(path, "torch-legacy", _state_dict_from_object(_materialise(root, get, path),
                                                                  path))


# ----------------------------------------------------------------------------------------------
# safetensors and Hugging Face directories.
# ----------------------------------------------------------------------------------------------

def _read_safetensors(path: str) -> Checkpoint:
  from safetensors.numpy import load_file
  try:
    tensors = load_file(path)
  except Exception as e:  # SafetensorError, OSError, ...
    raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
  return Checkpoint(path, "safetensors", dict(tensors))


def _read_hf_directory(path: str) -> Checkpoint:
  config_path = os.path.join(path, "config.json")
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{config_path}: cannot read the Hugging Face config ({e})") from e
  for weights in ("model.safetensors", "pytorch_model.bin"):
    for name in (weights, weights + ".index.json"):
      full = os.path.join(path, name)
      if not os.path.isfile(full):
        continue
      files = [full]
      if name.endswith(".index.json"):
        try:
          with open(full) as f:
            files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
          raise CheckpointError(f"{full}: malformed shard index ({e})") from e
      tensors: dict[str, np.ndarray] = {}
      fmt = None
      for file in files:
        part = read_checkpoint(file)
        fmt = part.format
        dup = set(part.tensors) & set(tensors)
        if dup:
          raise CheckpointError(f"{file}: key {sorted(dup)[0]!r} appears in several shards")
        tensors.update(part.tensors)
      return Checkpoint(path, "hf-directory", tensors, hf_config=config, weights_format=fmt)
  raise CheckpointError(f"{path}: Hugging Face directory without model.safetensors or "
                        f"pytorch_model.bin")


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
  """Reads any supported checkpoint (format detected from content) without executing code.

  Args:
    path: a file (.pt/.bin/.pth TorchScript or torch.save zip, legacy torch pickle,
      .safetensors) or a Hugging Face model directory.

  Returns:
    A `Checkpoint` whose `tensors` maps state-dict keys to numpy arrays.

  Raises:
    FileNotFoundError: nothing at `path`.
    UnsafePickleError: a pickle names a global outside the allow list.
    CheckpointError: anything else unreadable (message names the file and entry).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    return _read_hf_directory(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  with open(path, "rb") as f:
    head = f.read(16)
  if head[:4] == b"PK\x03\x04":
    return _read_zip(path)
  if head[:1] == b"\x80":  # pickle protocol >= 2
    return _read_legacy(path)
  if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header size, then JSON
    return _read_safetensors(path)
  raise CheckpointError(f"{path}: unrecognised file (not a PyTorch zip/pickle, TorchScript "
                        f"archive, safetensors file or Hugging Face directory)")
