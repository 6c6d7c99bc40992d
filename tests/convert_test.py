"""Conversion parity: randomly initialised PyTorch CLIPs (open_clip, Hugging Face) vs the Flax CLIP.

Each model is saved in every supported format. The full forward comparison (image, text, per-token
features, logits; float32, highest matmul precision) runs once per model on its first format; the
other formats must give bit-identical converted parameters. A round trip rebuilds every source
tensor from the Flax parameters (q/k/v slices included) and checks coverage is exactly once.

Relative error = max |jax - torch| / max |torch| over the whole output array.
"""

import json
import os
import pickle
import shutil
import time

import jax
import numpy as np
import pytest
from conftest import import_open_clip, make_ids

from tvr_jax import checkpointing, convert, torch_io
from tvr_jax.models import clip as clip_lib

TOL = 1e-5
PARITY: dict[str, dict[str, float]] = {}  # printed after the module's tests (pytest -s shows it)


@pytest.fixture(scope="module", autouse=True)
def _parity_report():
  yield
  for model, entries in PARITY.items():
    for key, value in entries.items():
      print(f"PARITY {model:28s} {key:48s} {value:.3g}")


def rel_err(got, want) -> float:
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())




def state_dict_np(model) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def save_openai_torchscript(model, path: str, image_size: int) -> list[str]:
  """Saves `model` as a traced TorchScript archive shaped like OpenAI's released ViT-B-32.pt.

  OpenAI's archives carry `input_resolution`, `context_length`, `vocab_size` as tensors in the
  state dict and hold the causal mask as a plain attribute (traced into a constant).
  """
  import torch
  m = model.eval()  # changed in place and restored below (a deep copy costs seconds)
  mask = m.attn_mask
  saved = {k: m.__dict__[k] for k in ("context_length", "vocab_size")}
  del m._buffers["attn_mask"]
  m.attn_mask = mask
  try:
    for key, value in (("input_resolution", image_size), *saved.items()):
      m.__dict__.pop(key, None)
      m.register_buffer(key, torch.tensor(value))
    dtype = m.visual.conv1.weight.dtype  # OpenAI's released archives hold float16 weights
    example = (torch.zeros(1, 3, image_size, image_size, dtype=dtype),
               torch.zeros(1, 77, dtype=torch.long))
    traced = torch.jit.trace(m, example, strict=False, check_trace=False)
    traced.save(path)
    return list(traced.state_dict())
  finally:
    for key in ("input_resolution", *saved):
      del m._buffers[key]
    m.__dict__.update(saved)
    del m.attn_mask
    m.register_buffer("attn_mask", mask, persistent=False)


def assert_params_equal(a: dict, b: dict, what: str):
  assert sorted(a) == sorted(b), what
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), f"{what}: {k} differs"


def assert_round_trip(conv: convert.Conversion, source: dict[str, np.ndarray]):
  """Rebuilds every source tensor from the Flax parameters; each element comes from one leaf."""
  recon: dict[str, np.ndarray] = {}
  for name, value in conv.params.items():
    src, rows = conv.provenance[name]
    if "conv1" in name:
      back = value.transpose(3, 2, 0, 1)
    elif name.endswith("/kernel") or (conv.naming == "hf" and name in ("visual/proj",
                                                                        "text_projection")):
      back = value.T
    else:
      back = value.reshape(value.shape if rows else source[src].shape)
    if rows is None:
      assert src not in recon, f"{src} feeds two leaves"
      recon[src] = back
    else:
      part = recon.setdefault(src, np.full(source[src].shape, np.nan, np.float32))
      assert np.isnan(part[rows[0]:rows[1]]).all(), f"{src} rows {rows} used twice"
      part[rows[0]:rows[1]] = back
  weight_keys = set(source) - set(conv.metadata)
  assert set(recon) == weight_keys, sorted(set(recon) ^ weight_keys)[:5]
  for k in weight_keys:
    assert np.array_equal(recon[k], source[k].astype(np.float32)), f"round trip changed {k}"


# ----------------------------------------------------------------------------------------------
# open_clip (OpenAI naming): ViT-B-32 and ViT-B-16.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,n_images,write", [("ViT-B-32", 2, True), ("ViT-B-16", 1, False)])
def test_open_clip_parity(name, n_images, write, tmp_path):
  """write: go through the output directory and load_clip (else convert in memory: faster)."""
  import safetensors.torch
  import torch
  open_clip = import_open_clip()
  torch.manual_seed(0)
  # OpenAI's CLIPs use QuickGELU; open_clip's plain ViT-B-32 config would use nn.GELU.
  model = open_clip.create_model(name, pretrained=None, force_quick_gelu=True).eval()
  sd_t = model.state_dict()
  sd = state_dict_np(model)
  assert len(sd) == 302

  files = {"torchscript": str(tmp_path / "openai_jit.pt"), "torch-zip": str(tmp_path / "sd.pt"),
           "torch-legacy": str(tmp_path / "sd.bin"),
           "safetensors": str(tmp_path / "sd.safetensors")}
  jit_keys = save_openai_torchscript(model, files["torchscript"], 224)
  assert sorted(jit_keys) == sorted(list(sd) + list(convert.OPENAI_METADATA_KEYS))
  torch.save(sd_t, files["torch-zip"])
  torch.save(sd_t, files["torch-legacy"], _use_new_zipfile_serialization=False)
  safetensors.torch.save_file({k: v.contiguous() for k, v in sd_t.items()}, files["safetensors"])

  # The TorchScript archive first; B/32 through the full CLI-equivalent path and load_clip.
  out = str(tmp_path / "converted")
  lines = []
  start = time.perf_counter()
  if write:
    conv = convert.convert(files["torchscript"], out, log=lines.append)
    assert len(lines) == 1 and "format      torchscript" in lines[0]
    info = json.load(open(os.path.join(out, clip_lib.CONFIG_FILE)))
    assert info["source_format"] == "torchscript" and info["vision_heads"] == 12
  else:
    conv = convert.map_checkpoint(torch_io.read_checkpoint(files["torchscript"]))
  PARITY.setdefault(name, {})["convert_seconds_torchscript"] = time.perf_counter() - start
  assert conv.source.format == "torchscript"
  assert conv.metadata == {"input_resolution": 224, "context_length": 77, "vocab_size": 49408}
  assert conv.config == clip_lib.CLIPConfig.preset(name.replace("ViT-B-", "ViT-B/"))
  assert_round_trip(conv, sd)
  if write:
    flax_model = clip_lib.load_clip(out)
  else:
    flax_model = clip_lib.clip_from_flat_params(conv.config, conv.params)
  rng = np.random.default_rng(1)
  images = rng.standard_normal((n_images, 3, 224, 224)).astype(np.float32)
  ids = make_ids(3, 77, seed=2, dtype=np.int64)
  with torch.no_grad():
    ti, tt = torch.from_numpy(images), torch.from_numpy(ids)
    ref_img = model.encode_image(ti).numpy()
    ref_txt = model.encode_text(tt).numpy()
    x = model.token_embedding(tt) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    ref_tok = (x @ model.text_projection).numpy()
    img_n = torch.nn.functional.normalize(torch.from_numpy(ref_img), dim=-1)
    txt_n = torch.nn.functional.normalize(torch.from_numpy(ref_txt), dim=-1)
    ref_logits = (model.logit_scale.exp() * img_n @ txt_n.T).numpy()
  with jax.default_matmul_precision("highest"):
    jimg = np.asarray(flax_model.encode_image(images.transpose(0, 2, 3, 1)))
    jsent, jtok, jmask = (np.asarray(a)
                          for a in flax_model.encode_text_tokens(ids.astype(np.int32)))
    jlogits = np.asarray(flax_model(images.transpose(0, 2, 3, 1), ids.astype(np.int32))[0])
  errors = {"image": rel_err(jimg, ref_img), "text": rel_err(jsent, ref_txt),
            "tokens": rel_err(jtok, ref_tok), "logits": rel_err(jlogits, ref_logits)}
  PARITY[name].update({f"{k} ({conv.source.format})": v for k, v in errors.items()})
  assert max(errors.values()) <= TOL, errors
  eot = ids.argmax(-1)
  np.testing.assert_array_equal(jmask, (np.arange(77)[None] <= eot[:, None]).astype(np.int32))

  # Every other format: the same parameters, bit for bit.
  for fmt, path in files.items():
    if fmt == "torchscript":
      continue
    other = convert.map_checkpoint(torch_io.read_checkpoint(path))
    assert other.source.format == fmt
    assert other.config == conv.config and other.metadata == {}
    assert_params_equal(other.params, conv.params, f"{name} {fmt}")
    PARITY[name][f"bit-identical ({fmt})"] = 1.0


# ----------------------------------------------------------------------------------------------
# Hugging Face CLIPModel with a non-default config.
# ----------------------------------------------------------------------------------------------

def test_hf_parity(tmp_path):
  import torch
  import_open_clip()  # registers the torchvision operator schemas transformers' import needs
  from transformers import CLIPConfig, CLIPModel
  torch.manual_seed(0)
  config = CLIPConfig(
      text_config=dict(hidden_size=96, num_attention_heads=3, num_hidden_layers=3,
                       intermediate_size=384),
      vision_config=dict(hidden_size=128, num_attention_heads=4, num_hidden_layers=2,
                         image_size=48, patch_size=16, intermediate_size=512),
      projection_dim=40)
  model = CLIPModel(config).eval()
  with torch.no_grad():  # non-trivial LayerNorm and logit scale values
    for p in model.parameters():
      if p.ndim <= 1:
        p.add_(0.1 * torch.randn_like(p))
  sd = state_dict_np(model)

  hf_dir = tmp_path / "hf"
  model.save_pretrained(hf_dir)
  bin_dir = tmp_path / "hf_bin"
  bin_dir.mkdir()
  shutil.copy(hf_dir / "config.json", bin_dir / "config.json")
  torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
  bare = tmp_path / "bare.safetensors"
  shutil.copy(hf_dir / "model.safetensors", bare)

  out = str(tmp_path / "converted")
  conv = convert.convert(str(hf_dir), out, log=lambda s: None)
  assert conv.naming == "hf" and conv.source.weights_format == "safetensors"
  c = conv.config
  assert (c.vision_width, c.vision_layers, c.vision_heads, c.image_size, c.patch_size) == (
      128, 2, 4, 48, 16)
  assert (c.text_width, c.text_layers, c.text_heads, c.embed_dim) == (96, 3, 3, 40)
  assert_round_trip(conv, sd)

  flax_model = clip_lib.load_clip(out)
  images = np.random.default_rng(1).standard_normal((2, 3, 48, 48)).astype(np.float32)
  ids = make_ids(3, 77, seed=3, dtype=np.int64)
  with torch.no_grad():
    ti, tt = torch.from_numpy(images), torch.from_numpy(ids)
    vis = model.vision_model(pixel_values=ti)
    ref_img = model.visual_projection(vis.pooler_output).numpy()
    txt = model.text_model(input_ids=tt)
    ref_txt = model.text_projection(txt.pooler_output).numpy()
    ref_tok = model.text_projection(txt.last_hidden_state).numpy()
    ref_logits = model(input_ids=tt, pixel_values=ti).logits_per_image.numpy()
  with jax.default_matmul_precision("highest"):
    jimg = np.asarray(flax_model.encode_image(images.transpose(0, 2, 3, 1)))
    jsent, jtok, _ = (np.asarray(a) for a in flax_model.encode_text_tokens(ids.astype(np.int32)))
    jlogits = np.asarray(flax_model(images.transpose(0, 2, 3, 1), ids.astype(np.int32))[0])
  errors = {"image": rel_err(jimg, ref_img), "text": rel_err(jsent, ref_txt),
            "tokens": rel_err(jtok, ref_tok), "logits": rel_err(jlogits, ref_logits)}
  PARITY["HF CLIPModel (non-default)"] = {f"{k} (hf-directory)": v for k, v in errors.items()}
  assert max(errors.values()) <= TOL, errors

  bin_conv = convert.map_checkpoint(torch_io.read_checkpoint(bin_dir))
  assert bin_conv.source.weights_format == "torch-zip"
  assert_params_equal(bin_conv.params, conv.params, "hf pytorch_model.bin")
  # A bare file has no config.json: heads default to width // 64 unless given.
  bare_ck = torch_io.read_checkpoint(bare)
  assert convert.map_checkpoint(bare_ck).config.vision_heads == 2
  bare_conv = convert.map_checkpoint(bare_ck, vision_heads=4, text_heads=3)
  assert bare_conv.config == conv.config
  assert_params_equal(bare_conv.params, conv.params, "hf bare safetensors")
  PARITY["HF CLIPModel (non-default)"].update({
      "bit-identical (hf-directory, pytorch_model.bin)": 1.0,
      "bit-identical (bare safetensors)": 1.0})


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing executed, no partial output.
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_state_dict():
  import torch
  open_clip = import_open_clip()
  from open_clip.model import CLIP
  torch.manual_seed(0)
  model = CLIP(embed_dim=32, quick_gelu=True,
               vision_cfg=dict(layers=2, width=64, patch_size=8, image_size=32, head_width=64),
               text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2))
  del open_clip
  return model.state_dict()


def test_float16_torchscript_archive(tmp_path):
  """OpenAI's released archives are float16: read them as such, convert to exact float32."""
  import torch
  import_open_clip()
  from open_clip.model import CLIP
  torch.manual_seed(1)
  model = CLIP(embed_dim=32, quick_gelu=True,
               vision_cfg=dict(layers=1, width=64, patch_size=8, image_size=32, head_width=64),
               text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1))
  model = model.half().eval()
  save_openai_torchscript(model, str(tmp_path / "fp16.pt"), 32)
  ck = torch_io.read_checkpoint(tmp_path / "fp16.pt")
  assert ck.format == "torchscript"
  assert {v.dtype for k, v in ck.tensors.items() if k not in convert.OPENAI_METADATA_KEYS} == {
      np.dtype(np.float16)}
  conv = convert.map_checkpoint(ck)
  assert conv.metadata["input_resolution"] == 32
  float_sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
  reference = convert.map_checkpoint(torch_io.Checkpoint("<float32 copy>", "memory", float_sd))
  assert_params_equal(conv.params, reference.params, "float16 archive")
  assert_round_trip(conv, {k: v for k, v in ck.tensors.items()})


def _assert_clean(parent, out):
  assert not os.path.exists(out), f"partial output {out} left behind"
  leftovers = [n for n in os.listdir(parent) if n.startswith(".")]
  assert not leftovers, f"temporary directories left behind: {leftovers}"


def _run_cli(src, out, capsys):
  rc = convert.main(["--src", str(src), "--out", str(out)])
  return rc, capsys.readouterr().err


def test_bad_inputs(tiny_state_dict, tmp_path, capsys):
  import torch
  src_dir = tmp_path / "src"
  src_dir.mkdir()
  out_parent = tmp_path / "out"
  out_parent.mkdir()
  out = out_parent / "clip"

  good = src_dir / "good.pt"
  torch.save(tiny_state_dict, good)
  cases = {}
  (src_dir / "notes.txt").write_text("this is not a checkpoint\n")
  cases["notes.txt"] = "unrecognised file"
  data = good.read_bytes()
  (src_dir / "truncated.pt").write_bytes(data[: len(data) // 2])
  cases["truncated.pt"] = "truncated.pt"
  missing = dict(tiny_state_dict)
  del missing["visual.transformer.resblocks.1.mlp.c_fc.bias"]
  torch.save(missing, src_dir / "missing.pt")
  cases["missing.pt"] = "'visual.transformer.resblocks.1.mlp.c_fc.bias'"
  extra = dict(tiny_state_dict, **{"visual.extra_head.weight": torch.zeros(3)})
  torch.save(extra, src_dir / "extra.pt")
  cases["extra.pt"] = "'visual.extra_head.weight'"
  wrong = dict(tiny_state_dict, **{"transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(100, 64)})
  torch.save(wrong, src_dir / "wrong_shape.pt")
  cases["wrong_shape.pt"] = "'transformer.resblocks.0.mlp.c_fc.weight'"
  bad_meta = dict(tiny_state_dict, input_resolution=torch.tensor(224))
  torch.save(bad_meta, src_dir / "bad_meta.pt")
  cases["bad_meta.pt"] = "'input_resolution'"

  for name, needle in cases.items():
    rc, err = _run_cli(src_dir / name, out, capsys)
    assert rc == 1, name
    assert needle in err and name in err, (name, err)
    _assert_clean(out_parent, out)

  # Hostile pickles: an os.system call must not run, whether in a torch zip or a bare pickle.
  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  torch.save({"visual.conv1.weight": Evil()}, src_dir / "evil.pt")
  with open(src_dir / "evil.bin", "wb") as f:
    pickle.dump({"a": Evil()}, f, protocol=2)
  for name in ("evil.pt", "evil.bin"):
    rc, err = _run_cli(src_dir / name, out, capsys)
    assert rc == 1 and "refusing to unpickle global 'posix.system'" in err and name in err, err
    assert not marker.exists()
    _assert_clean(out_parent, out)
    with pytest.raises(torch_io.UnsafePickleError):
      torch_io.read_checkpoint(src_dir / name)
  assert not marker.exists()


def test_existing_output_and_failed_overwrite(tiny_state_dict, tmp_path, capsys):
  import torch
  good = tmp_path / "good.pt"
  torch.save(tiny_state_dict, good)
  out = tmp_path / "out" / "clip"
  assert convert.main(["--src", str(good), "--out", str(out), "--vision-heads", "1"]) == 0
  assert "wrote" in capsys.readouterr().out
  before = sorted(os.listdir(out))
  # An existing DIR is refused without --overwrite, and left as it was.
  rc, err = _run_cli(good, out, capsys)
  assert rc == 1 and "already exists" in err
  assert sorted(os.listdir(out)) == before
  # A failing --overwrite leaves the previous output intact and no temporaries.
  broken = tmp_path / "broken.pt"
  torch.save({k: v for k, v in tiny_state_dict.items() if k != "ln_final.bias"}, broken)
  assert convert.main(["--src", str(broken), "--out", str(out), "--overwrite"]) == 1
  assert "'ln_final.bias'" in capsys.readouterr().err
  assert sorted(os.listdir(out)) == before
  assert [n for n in os.listdir(out.parent) if n.startswith(".")] == []
  # A working --overwrite replaces it; the loaded model has the new weights.
  assert convert.main(["--src", str(good), "--out", str(out), "--overwrite"]) == 0
  model = clip_lib.load_clip(out)
  np.testing.assert_array_equal(np.asarray(model.ln_final.bias[...]),
                                tiny_state_dict["ln_final.bias"].numpy())
  # load_clip: clear errors for a directory that is not a conversion, or sizes that do not fit.
  with pytest.raises(FileNotFoundError, match="clip_config.json"):
    clip_lib.load_clip(tmp_path)
  with pytest.raises(ValueError, match="visual/positional_embedding has shape"):
    clip_lib.load_clip(out, image_size=64)


def test_checkpointing_round_trip_and_atomic(tmp_path):
  tree = {"a": {"b": np.arange(6, dtype=np.float32).reshape(2, 3)}, "s": np.float32(2.5)}
  path = tmp_path / "ck"
  checkpointing.save_pytree(path, tree)
  with pytest.raises(FileExistsError):
    checkpointing.save_pytree(path, tree)
  restored = checkpointing.restore_pytree(path)
  np.testing.assert_array_equal(restored["a"]["b"], tree["a"]["b"])
  abstract = {"a": {"b": jax.ShapeDtypeStruct((2, 3), np.float32)},
              "s": jax.ShapeDtypeStruct((), np.float32)}
  assert float(checkpointing.restore_pytree(path, abstract)["s"]) == 2.5
  with pytest.raises(ValueError, match="a/b has shape"):
    checkpointing.restore_pytree(path, {**abstract, "a": {"b": jax.ShapeDtypeStruct((3, 2),
                                                                                     np.float32)}})
  # A tree Orbax cannot save leaves nothing behind.
  with pytest.raises(ValueError):
    checkpointing.save_pytree(tmp_path / "bad", {"x": object()})
  assert sorted(os.listdir(tmp_path)) == ["ck"]
