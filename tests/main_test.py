"""Tests for the entry point and bad input: unknown keys, missing data/CLIP, indivisible batch,
indivisible gradient-caching micro-batches, checkpoints of another model size or corrupt,
zero-shot evaluation."""

import json
import os
import shutil
import subprocess

import pytest

from conftest import REPO_ROOT, main_command, smoke_config, subprocess_env
from configs import base, msvd, synthetic
from tvr_jax import checkpointing, train
from tvr_jax.data import datasets


def test_bad_model_key_or_value_on_command_line_writes_nothing(tmp_path):
  for override, expected in (({"model.headr": "seqTransf"},
                              "unknown config key 'model.headr' in --config.model.headr=seqTransf; "
                              "did you mean model.header?"),
                             ({"model.header": "seqLSTM"},
                              "error: config.model: header must be one of")):
    proc = subprocess.run(main_command("smoke", tmp_path / "w", **override),
                          env=dict(os.environ, PYTHONPATH=REPO_ROOT),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


def test_unknown_key_on_command_line(tmp_path):
  proc = subprocess.run(main_command("smoke", tmp_path / "w", no_such_key=1),
                        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "unknown config key 'no_such_key' in --config.no_such_key=1" in proc.stderr
  assert not (tmp_path / "w").exists()


def test_unknown_key_in_config_file_and_bad_values():
  # The base config is locked where it is made: a typo fails on the line that writes it.
  c = base.get_base_config()
  with pytest.raises(AttributeError, match="lerning_rate"):
    c.lerning_rate = 1.0
  with pytest.raises(AttributeError, match="b3"):
    c.optimizer.b3 = 0.5
  with pytest.raises(AttributeError, match="headr"):
    msvd.get_config().model.headr = "seqTransf"
  c = base.get_base_config()
  c.model.header = "seqLSTM"
  with pytest.raises(train.ConfigError, match="header must be one of .*'seqLSTM'"):
    train.validate_config(c)
  c = base.get_base_config()
  c.accum_steps = 3   # gradient caching: the global batch (128) must split into 3 micro-batches
  with pytest.raises(ValueError, match="accum_steps=3.*does not split into accum_steps=3"):
    train.validate_config(c)
  c = base.get_base_config()
  c.nan_policy = "ignore"
  with pytest.raises(ValueError, match="nan_policy='ignore'"):
    train.validate_config(c)
  with pytest.raises(ValueError, match="unknown config argument 'fast'"):
    msvd.get_config("fast")


def test_missing_clip_and_dataset_say_what_to_run(tmp_path):
  c = msvd.get_config()
  c.data_dir = str(tmp_path / "tfds")
  c.init_from = str(tmp_path / "ViT-B-32")
  with pytest.raises(FileNotFoundError, match=r"python -m tvr_jax.convert --src ViT-B-32.pt --out"):
    datasets.check_inputs(c)
  c.init_from = ""
  with pytest.raises(FileNotFoundError,
                     match=r"python -m data_prep.build msvd --manual_dir=.* --data_dir=.*tfds"):
    datasets.check_inputs(c)
  assert not (tmp_path / "tfds").exists()


@pytest.mark.devices(3)
def test_batch_not_divisible_by_data_axis(small_synthetic_data, tmp_path):
  c = synthetic.get_config("smoke")
  c.data_dir, c.batch_size, c.progress_bar = small_synthetic_data, 8, False
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(c, str(tmp_path / "w"))
  assert "config.batch_size=8 is not divisible by the 3 data-parallel shards" in str(e.value)
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_checkpoint_of_other_model_or_corrupt_is_clear_error(small_synthetic_data, tmp_path):
  workdir = str(tmp_path)
  c = smoke_config(small_synthetic_data, num_train_steps=1, eval_max_examples=8)
  train.train_and_evaluate(c, workdir)
  step_dir = tmp_path / "checkpoints" / "1"
  listing = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "checkpoints").rglob("*"))

  # Another model size (tiny widths, 8 px patches instead of 16): refused, nothing written.
  other = smoke_config(small_synthetic_data, num_train_steps=2, clip_preset="tiny")
  with pytest.raises(checkpointing.CheckpointError, match=r"checkpoint .*checkpoints/1 "):
    train.train_and_evaluate(other, workdir)
  assert sorted(str(p.relative_to(tmp_path))
                for p in (tmp_path / "checkpoints").rglob("*")) == listing

  # Corrupt: the state item's array store is gone.
  for p in (step_dir / "state").iterdir():
    if p.name != "_METADATA":
      shutil.rmtree(p) if p.is_dir() else p.unlink()
  with pytest.raises(checkpointing.CheckpointError, match=r"checkpoints/1 .*(corrupt|unreadable)"):
    train.train_and_evaluate(smoke_config(small_synthetic_data, num_train_steps=2,
                                          resume_allow_changes="num_train_steps"), workdir)
  assert not (tmp_path / "checkpoints" / "2").exists()


def test_zero_shot_eval_of_converted_clip(small_synthetic_data, tmp_path):
  """--config.mode=eval --config.init_from=DIR evaluates a converted CLIP with no training."""
  import jax
  from flax import nnx
  from tvr_jax.models import clip as clip_lib
  config = clip_lib.CLIPConfig.preset("tiny-64")
  model = clip_lib.CLIP(config, rngs=nnx.Rngs(3))
  clip_dir = tmp_path / "clip"
  checkpointing.save_pytree(clip_dir / clip_lib.PARAMS_DIR,
                            jax.tree.map(lambda x: x,
                                         nnx.to_pure_dict(nnx.state(model, nnx.Param))))
  (clip_dir / clip_lib.CONFIG_FILE).write_text(json.dumps(config.to_dict()))
  proc = subprocess.run(
      main_command("smoke", tmp_path / "eval", data_dir=small_synthetic_data, mode="eval",
                   init_from=clip_dir, eval_max_examples=8),
      env=subprocess_env(small_synthetic_data), cwd=REPO_ROOT, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "eval" / "eval_step_0.json").read_text())
  assert report["step"] == 0 and report["num_videos"] == 8
  assert set(report["metrics"]) >= {"t2v/R@1", "v2t/R@1", "dsl/t2v/R@1"}
  assert "t2v" in proc.stdout and "R@1" in proc.stdout   # the console table
  assert not (tmp_path / "eval" / "checkpoints" / "0").exists()
