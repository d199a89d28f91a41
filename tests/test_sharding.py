"""Sharding from config: rules, meshes, parity of DP / FSDP / FSDP+TP with one device, checkpoint reshards.

The multi-device results come from one 8-device subprocess (tests/sharding_worker.py), shared by the
tests below and by tests/test_multihost.py.
"""
from __future__ import annotations

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ditjax.config import ConfigError, base_config, validate
from ditjax.models import dit_config
from ditjax.parallel.costs import communication_bytes, param_bytes_per_device
from ditjax.parallel.logical import logical_to_spec
from ditjax.parallel.mesh import mesh_shape, resolve_rules
from ditjax.parallel.rules import RULE_PRESETS, format_rules, parse_rules, rules_from_config
from ditjax.train.state import abstract_model
from multidevice import LOSS_RTOL, STEPS, sharding_results

FSDP = RULE_PRESETS["fsdp"]
MESH = {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}


# ---- rules and meshes (no devices needed) ------------------------------------------------------

def test_rules_prefer_width_and_fall_back_when_it_does_not_divide():
    xl_256 = {**MESH, "fsdp": 256}
    assert logical_to_spec(("embed", "mlp"), FSDP, MESH, (1152, 4608)) == P("fsdp", None)
    assert logical_to_spec(("mlp", "embed"), FSDP, MESH, (4608, 1152)) == P(None, "fsdp")
    # 1152 is not divisible by 256: the MLP dimension takes the fsdp axis instead.
    assert logical_to_spec(("embed", "mlp"), FSDP, xl_256, (1152, 4608)) == P(None, "fsdp")
    assert logical_to_spec(("layers", "embed", "adaln"), FSDP, xl_256, (28, 1152, 6912)) == P(None, None, "fsdp")
    # Nothing divides: replicated rather than an error.
    spec = logical_to_spec(("embed", None, "heads", "head_dim"), FSDP, xl_256, (1152, 3, 16, 72))
    assert spec == P(None, None, None, None)


def test_activation_batch_takes_fsdp_before_width():
    spec = logical_to_spec(("batch", "tokens", "embed"), FSDP, MESH, (64, 256, 1152))
    assert spec == P(("data", "fsdp", "expert"), None, None)
    tp = {**MESH, "fsdp": 4, "tensor": 2}
    spec = logical_to_spec(("batch", "tokens", "heads", "head_dim"), RULE_PRESETS["fsdp_tp"], tp, (64, 256, 16, 72))
    assert spec == P(("data", "fsdp", "expert"), None, "tensor", None)


def test_custom_rules_parse_override_and_reject_typos():
    rules = rules_from_config({"rules": "fsdp", "custom_rules": "adaln=tensor, vocab=fsdp+data, mlp="})
    assert rules[:3] == [("adaln", "tensor"), ("vocab", ("fsdp", "data")), ("mlp", None)]
    assert parse_rules(format_rules(rules)) == rules
    tp = {**MESH, "fsdp": 4, "tensor": 2}
    assert logical_to_spec(("embed", "adaln"), rules, tp, (32, 192)) == P("fsdp", "tensor")
    assert logical_to_spec(("mlp", "embed"), rules, tp, (128, 32)) == P(None, "fsdp")  # mlp pinned replicated
    for bad, match in [("emb=fsdp", "unknown logical axis"), ("embed=fdsp", "unknown mesh axis"), ("embed", "form")]:
        with pytest.raises(ValueError, match=match):
            parse_rules(bad)
    config = base_config()
    config.mesh.custom_rules = "mlp=tensr"
    with pytest.raises(ConfigError, match="tensr"):
        validate(config, num_devices=1, check_data=False)
    assert resolve_rules("fsdp") == FSDP and resolve_rules(config.mesh.rules) == RULE_PRESETS["dp"]


def test_mesh_shape_fills_and_explains_mismatches():
    cfg = base_config().mesh
    assert mesh_shape(cfg, 8) == {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}
    cfg.update(data=2, fsdp=-1, tensor=2)
    assert mesh_shape(cfg, 8) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    with pytest.raises(ValueError, match="does not divide the 6 devices"):
        mesh_shape(cfg, 6)
    cfg.update(data=2, fsdp=4, tensor=2)
    with pytest.raises(ValueError, match="needs 16 devices but 8 are present"):
        mesh_shape(cfg, 8)
    cfg.update(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="only one of"):
        mesh_shape(cfg, 8)


def test_analytic_param_bytes_and_communication():
    _, state = abstract_model(dit_config("DiT-XL/2", input_size=32))
    full = param_bytes_per_device(state, RULE_PRESETS["dp"], MESH)
    assert full == 4 * 674_834_720  # DiT-XL/2 at 256px: the reference 675,129,632 less its fixed pos_embed
    sharded = param_bytes_per_device(state, FSDP, {**MESH, "fsdp": 64})
    assert full / 64 <= sharded < full / 64 * 1.01  # only biases that 64 does not divide stay whole
    comm = communication_bytes(full, {**MESH, "fsdp": 64}, dit_config("DiT-XL/2", input_size=32), 256)
    assert comm["fsdp_all_gather"] == pytest.approx(full * 63 / 64) == comm["fsdp_reduce_scatter"]


# ---- 8 simulated devices (one subprocess) ------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("preset", ["dp", "fsdp", "fsdp_tp"])
def test_sharded_training_matches_one_device(preset):
    runs = sharding_results()["runs"]
    assert len(runs[preset]["losses"]) == STEPS
    np.testing.assert_allclose(runs[preset]["losses"], runs["single"]["losses"], rtol=LOSS_RTOL)


EXPECTED_SPECS = {
    "dp": {k: "P(None, None)" for k in ("fc1", "fc2", "adaln", "embedding_table")}
    | {"qkv": "P(None, None, None, None)", "proj": "P(None, None, None)"},
    "fsdp": {"qkv": "P('fsdp', None, None, None)", "proj": "P(None, None, 'fsdp')", "fc1": "P('fsdp', None)",
             "fc2": "P(None, 'fsdp')", "adaln": "P('fsdp', None)", "embedding_table": "P(None, 'fsdp')"},
    "fsdp_tp": {"qkv": "P('fsdp', None, 'tensor', None)", "proj": "P('tensor', None, 'fsdp')",
                "fc1": "P('fsdp', 'tensor')", "fc2": "P('tensor', 'fsdp')", "adaln": "P('fsdp', 'tensor')",
                "embedding_table": "P(None, 'fsdp')"},
}


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["dp", "fsdp", "fsdp_tp"])
def test_parameters_are_sharded_as_the_rules_say(preset):
    run = sharding_results()["runs"][preset]
    assert run["specs"] == EXPECTED_SPECS[preset]
    # What device 0 really holds equals the analytic per-device size the plan and docs use.
    assert run["param_bytes_device0"] == run["param_bytes_analytic"]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["data2_fsdp4", "one_device"])
def test_fsdp8_checkpoint_restores_on_other_meshes(target):
    restored = sharding_results()["reshard"][target]
    assert restored["equal"]
    assert restored["data_state"] == {"next_index": STEPS}
    expected_mesh = {"data": 2, "fsdp": 4} if target == "data2_fsdp4" else {"data": 1, "fsdp": 1}
    assert restored["mesh"] == {**expected_mesh, "tensor": 1, "expert": 1}


@pytest.mark.slow
def test_per_shard_kernels_see_only_their_shard():
    result = sharding_results()["shard_over_mesh"]
    assert result["equal"] and result["local_shape"] == [16 // 4, 8, 2 // 2, 4]  # batch / fsdp, heads / tensor
