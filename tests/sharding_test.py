"""Tests for tvr_jax.sharding: mesh sizing, the rule table, sharded initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tvr_jax import sharding


def test_mesh_shape_absorbs_rest_and_rejects_bad_sizes():
  assert sharding.mesh_shape({"data": -1, "fsdp": 1}, 8) == (8, 1)
  assert sharding.mesh_shape({"data": 2, "fsdp": -1}, 8) == (2, 4)
  assert sharding.mesh_shape({"data": 1, "fsdp": 1}, 1) == (1, 1)
  with pytest.raises(ValueError, match="needs 6 devices, but 8"):
    sharding.mesh_shape({"data": 2, "fsdp": 3}, 8)
  with pytest.raises(ValueError, match="do not divide the 8"):
    sharding.mesh_shape({"data": -1, "fsdp": 3}, 8)
  with pytest.raises(ValueError, match="unknown axes.*model"):
    sharding.mesh_shape({"model": 2}, 8)
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_fsdp_spec_picks_largest_divisible_dim():
  assert sharding.fsdp_spec((768, 512), 4) == P("fsdp", None)
  assert sharding.fsdp_spec((512, 768), 4) == P(None, "fsdp")
  assert sharding.fsdp_spec((6, 10), 4) == P()        # nothing divisible → replicated
  assert sharding.fsdp_spec((3, 3, 8), 4) == P(None, None, "fsdp")
  assert sharding.fsdp_spec((100,), 1) == P()


@pytest.mark.devices(8)
def test_sharded_init_on_8_devices():
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
  rules = [(r"frozen/", "replicate"), (r"explicit/w$", ("data", None)), (r".*", "fsdp")]

  def init():
    k = jax.random.key(0)
    return {"big": {"kernel": jax.random.normal(k, (256, 128))},
            "small": {"bias": jnp.zeros((128,))},
            "frozen": {"kernel": jnp.ones((256, 128))},
            "explicit": {"w": jnp.ones((64, 256))}}
  abstract, shardings = sharding.abstract_sharded(init, mesh, rules, min_fsdp_size=1024)
  tree = jax.jit(init, out_shardings=shardings)()
  assert all(a.sharding == t.sharding
             for a, t in zip(jax.tree.leaves(abstract), jax.tree.leaves(tree)))
  res = {k: str(v["kernel" if "kernel" in v else ("bias" if "bias" in v else "w")].sharding.spec)
         for k, v in tree.items()}
  res["mesh"] = dict(mesh.shape)
  res["shard_shape"] = list(tree["big"]["kernel"].addressable_shards[0].data.shape)
  ref = jax.random.normal(jax.random.key(0), (256, 128))
  res["equal"] = bool(np.array_equal(np.asarray(tree["big"]["kernel"]), np.asarray(ref)))
  try:
    sharding.check_batch_size(12, mesh)
  except ValueError as e:
    res["err"] = str(e)
  assert res["mesh"] == {"data": 2, "fsdp": 4}
  assert res["big"] == str(P("fsdp", None))
  assert res["shard_shape"] == [64, 128]
  assert res["small"] == str(P())          # below min_fsdp_size
  assert res["frozen"] == str(P())
  assert res["explicit"] == str(P("data", None))
  assert res["equal"]
  assert "batch_size=12 is not divisible by the 8 data-parallel shards" in res["err"]


def test_bad_explicit_rule_is_named():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1})
  with pytest.raises(ValueError, match="unknown sharding rule 'shard_me'"):
    sharding.spec_for("a/b", (4096, 8), mesh, [(".*", "shard_me")], min_fsdp_size=1)
  with pytest.raises(ValueError, match="more entries than a/b"):
    sharding.spec_for("a/b", (4096,), mesh, [(".*", ("data", None))], min_fsdp_size=1)
  assert len(jax.devices()) >= 1
