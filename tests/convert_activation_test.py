"""The MLP activation (QuickGELU vs exact GELU) through conversion: flag, sources, parity.

open_clip's default configs (and the LAION / DataComp weights trained with them) use `nn.GELU`;
OpenAI's CLIPs use QuickGELU. A state dict does not say which; these tests check that each source
that does say is read, that an assumption is printed with the flag that changes it, and that the
converted model matches the PyTorch one in float32 (highest matmul precision), relative error =
max |jax - torch| / max |torch|.
"""

import json
import os

import jax
import numpy as np
import pytest
from conftest import import_open_clip, make_ids
from convert_test import save_openai_torchscript

from tvr_jax import convert, torch_io
from tvr_jax.models import clip as clip_lib

TOL = 1e-5
# Two blocks per tower: enough to show the activation, cheap on two shared cores.
SMALL_B32 = dict(vision_cfg=dict(image_size=64, layers=2, width=128, patch_size=32),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2),
                 embed_dim=64)


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _open_clip(name, **overrides):
  import torch
  open_clip = import_open_clip()
  torch.manual_seed(0)
  return open_clip.create_model(name, pretrained=None, **overrides).eval()


def _torch_embeddings(model, images, ids):
  import torch
  with torch.no_grad():
    return (model.encode_image(torch.from_numpy(images)).numpy(),
            model.encode_text(torch.from_numpy(ids)).numpy())


def _flax_embeddings(flax_model, images, ids):
  with jax.default_matmul_precision("highest"):
    return (np.asarray(flax_model.encode_image(images.transpose(0, 2, 3, 1))),
            np.asarray(flax_model.encode_text(ids.astype(np.int32))))


def _errors(flax_model, torch_model, images, ids):
  got = _flax_embeddings(flax_model, images, ids)
  want = _torch_embeddings(torch_model, images, ids)
  return {"image": rel_err(got[0], want[0]), "text": rel_err(got[1], want[1])}


def _inputs(n_images, size, seed=1):
  images = np.random.default_rng(seed).standard_normal((n_images, 3, size, size)).astype(np.float32)
  return images, make_ids(2, 77, seed=seed + 1, dtype=np.int64)


def _save_state_dict(model, path):
  import torch
  torch.save(model.state_dict(), path)
  return str(path)


# ----------------------------------------------------------------------------------------------
# open_clip default (GELU) configurations, full size: ViT-B-32 through the CLI, ViT-B-16 in memory.
# ----------------------------------------------------------------------------------------------

def test_open_clip_vit_b32_default_gelu_via_cli(tmp_path, capsys):
  model = _open_clip("ViT-B-32")
  assert type(model.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"  # open_clip default
  src = _save_state_dict(model, tmp_path / "sd.pt")
  out = tmp_path / "converted"
  assert convert.main(["--src", src, "--out", str(out), "--activation", "gelu"]) == 0
  printed = capsys.readouterr().out
  assert "activation  gelu (--activation)" in printed and "ASSUMED" not in printed
  info = json.load(open(os.path.join(out, clip_lib.CONFIG_FILE)))
  assert info["activation"] == "gelu" and info["activation_source"] == "--activation"
  flax_model = clip_lib.load_clip(out)
  assert flax_model.config == clip_lib.CLIPConfig.preset("ViT-B/32", activation="gelu")
  images, ids = _inputs(1, 224)
  errors = _errors(flax_model, model, images, ids)
  assert max(errors.values()) <= TOL, errors
  # The same weights read as QuickGELU (today's silent default) are visibly wrong.
  quick = clip_lib.clip_from_flat_params(flax_model.config.replace(activation="quick_gelu"),
                                         _flat_params(flax_model))
  wrong = _errors(quick, model, images, ids)
  assert min(wrong.values()) > 1e-3, wrong


def _flat_params(flax_model):
  from flax import nnx
  return clip_lib.flatten_params(nnx.to_pure_dict(nnx.state(flax_model, nnx.Param)))


def test_open_clip_vit_b16_default_gelu(tmp_path):
  model = _open_clip("ViT-B-16")
  src = _save_state_dict(model, tmp_path / "sd.pt")
  conv = convert.map_checkpoint(torch_io.read_checkpoint(src), activation="gelu")
  assert conv.config == clip_lib.CLIPConfig.preset("ViT-B/16", activation="gelu")
  assert conv.activation_source == "--activation"
  flax_model = clip_lib.clip_from_flat_params(conv.config, conv.params)
  errors = _errors(flax_model, model, *_inputs(1, 224))
  assert max(errors.values()) <= TOL, errors


# ----------------------------------------------------------------------------------------------
# What is printed when the source does not say; QuickGELU open_clip models still match.
# ----------------------------------------------------------------------------------------------

def test_plain_state_dict_prints_the_assumption(tmp_path, capsys):
  model = _open_clip("ViT-B-32", **SMALL_B32)  # GELU, as open_clip's default config
  src = _save_state_dict(model, tmp_path / "sd.pt")
  out = tmp_path / "assumed"
  assert convert.main(["--src", src, "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "quick_gelu ASSUMED" in printed and "--activation gelu" in printed, printed
  info = json.load(open(os.path.join(out, clip_lib.CONFIG_FILE)))
  assert info["activation"] == "quick_gelu" and info["activation_source"] == "assumed"
  # Following the printed advice gives the right model.
  fixed = tmp_path / "gelu"
  assert convert.main(["--src", src, "--out", str(fixed), "--activation", "gelu"]) == 0
  assert "ASSUMED" not in capsys.readouterr().out
  images, ids = _inputs(2, 64)
  assert max(_errors(clip_lib.load_clip(fixed), model, images, ids).values()) <= TOL
  assert min(_errors(clip_lib.load_clip(out), model, images, ids).values()) > 1e-3


@pytest.mark.parametrize("flag", [None, "quick_gelu"])
def test_quickgelu_open_clip_still_matches(flag, tmp_path):
  model = _open_clip("ViT-B-32-quickgelu", **SMALL_B32)
  src = _save_state_dict(model, tmp_path / "sd.pt")
  conv = convert.map_checkpoint(torch_io.read_checkpoint(src), activation=flag)
  assert conv.config.activation == "quick_gelu"
  assert conv.activation_source == ("assumed" if flag is None else "--activation")
  flax_model = clip_lib.clip_from_flat_params(conv.config, conv.params)
  errors = _errors(flax_model, model, *_inputs(2, 64))
  assert max(errors.values()) <= TOL, errors


def test_torchscript_is_quickgelu_and_a_contradicting_flag_fails(tmp_path, capsys):
  model = _open_clip("ViT-B-32-quickgelu", **SMALL_B32)
  path = str(tmp_path / "openai_jit.pt")
  save_openai_torchscript(model, path, 64)
  conv = convert.map_checkpoint(torch_io.read_checkpoint(path))
  assert conv.config.activation == "quick_gelu"
  assert conv.activation_source == "OpenAI TorchScript archive"
  assert convert.map_checkpoint(torch_io.read_checkpoint(path),
                                activation="quick_gelu").config.activation == "quick_gelu"
  out = tmp_path / "out"
  assert convert.main(["--src", path, "--out", str(out), "--activation", "gelu"]) == 1
  err = capsys.readouterr().err
  assert "--activation gelu contradicts" in err and "TorchScript" in err, err
  assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Hugging Face config.json `hidden_act`.
# ----------------------------------------------------------------------------------------------

def _hf_model(hidden_act):
  import torch
  import_open_clip()  # registers the torchvision operator schemas transformers' import needs
  from transformers import CLIPConfig, CLIPModel
  torch.manual_seed(0)
  config = CLIPConfig(
      text_config=dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=2,
                       intermediate_size=256, hidden_act=hidden_act),
      vision_config=dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=2,
                         image_size=32, patch_size=16, intermediate_size=256,
                         hidden_act=hidden_act),
      projection_dim=32)
  return CLIPModel(config).eval()


def _hf_errors(flax_model, model, images, ids):
  import torch
  with torch.no_grad():
    ti, tt = torch.from_numpy(images), torch.from_numpy(ids)
    ref_img = model.visual_projection(model.vision_model(pixel_values=ti).pooler_output).numpy()
    ref_txt = model.text_projection(model.text_model(input_ids=tt).pooler_output).numpy()
  got = _flax_embeddings(flax_model, images, ids)
  return {"image": rel_err(got[0], ref_img), "text": rel_err(got[1], ref_txt)}


@pytest.mark.parametrize("hidden_act", ["gelu", "quick_gelu"])
def test_hf_hidden_act_is_read(hidden_act, tmp_path):
  model = _hf_model(hidden_act)
  hf_dir = tmp_path / "hf"
  model.save_pretrained(hf_dir)
  conv = convert.map_checkpoint(torch_io.read_checkpoint(hf_dir))
  assert conv.config.activation == hidden_act
  assert conv.activation_source == "config.json hidden_act"
  errors = _hf_errors(clip_lib.clip_from_flat_params(conv.config, conv.params), model,
                      *_inputs(2, 32))
  assert max(errors.values()) <= TOL, errors
  other = "quick_gelu" if hidden_act == "gelu" else "gelu"
  with pytest.raises(convert.ConversionError, match=f"--activation {other} contradicts"):
    convert.map_checkpoint(torch_io.read_checkpoint(hf_dir), activation=other)
  assert convert.map_checkpoint(torch_io.read_checkpoint(hf_dir),
                                activation=hidden_act).config.activation == hidden_act


def test_hf_unimplemented_or_mixed_hidden_act_is_refused(tmp_path):
  hf_dir = tmp_path / "hf"
  _hf_model("gelu").save_pretrained(hf_dir)
  config_path = hf_dir / "config.json"
  original = json.loads(config_path.read_text())
  for vision_act, text_act, needle in (("gelu_new", "gelu_new", "'gelu_new'"),
                                       ("gelu", "quick_gelu", "differ")):
    cfg = json.loads(json.dumps(original))
    cfg["vision_config"]["hidden_act"] = vision_act
    cfg["text_config"]["hidden_act"] = text_act
    config_path.write_text(json.dumps(cfg))
    with pytest.raises(convert.ConversionError, match=needle) as info:
      convert.map_checkpoint(torch_io.read_checkpoint(hf_dir))
    assert str(hf_dir) in str(info.value)


def test_clip_config_activation_field():
  assert clip_lib.CLIPConfig().activation == "quick_gelu"
  legacy = {k: v for k, v in clip_lib.CLIPConfig.preset("tiny").to_dict().items()
            if k != "activation"}  # clip_config.json written before the field existed
  assert clip_lib.CLIPConfig.from_dict(legacy).activation == "quick_gelu"
  gelu = clip_lib.CLIPConfig.preset("tiny", activation="gelu")
  assert clip_lib.CLIPConfig.from_dict(json.loads(json.dumps(gelu.to_dict()))) == gelu
  with pytest.raises(ValueError, match="'swish'"):
    clip_lib.CLIPConfig(activation="swish")
  import torch
  x = np.linspace(-6, 6, 1001, dtype=np.float32)
  np.testing.assert_allclose(np.asarray(clip_lib.gelu(x)),
                             torch.nn.GELU()(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-6)
