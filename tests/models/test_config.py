"""ModelConfig: both file formats, the built-in names, and a ConfigError for every bad input."""
from __future__ import annotations

import copy
import json
import math
import pickle
from pathlib import Path

import pytest

from dsr_compiler.errors import ConfigError, DsrError
from dsr_compiler.models import BUILTIN_NAMES, ModelConfig, QuantConfig, RopeScaling
from dsr_compiler.models.config import SPECS_DIR

HF_V3 = SPECS_DIR / "deepseek-v3.hf-config.json"
MA_V3 = SPECS_DIR / "deepseek-v3.modelargs.json"
MA_V2L = SPECS_DIR / "deepseek-v2-lite.modelargs.json"


def _hf() -> dict:
    return json.loads(HF_V3.read_text())


def _ma() -> dict:
    return json.loads(MA_V3.read_text())


def _write(tmp_path: Path, data, name: str = "config.json") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


# ---- good files ---------------------------------------------------------------------------------
def test_hf_v3_fields():
    c = ModelConfig.from_json(HF_V3)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size) == (7168, 61, 128, 129280)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (256, 8, 8, 4)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_head_dim, c.v_head_dim) == (1536, 512, 192, 128)
    assert c.scoring_func == "sigmoid" and c.topk_method == "noaux_tc" and c.norm_topk_prob
    assert c.routed_scaling_factor == 2.5 and c.first_k_dense_replace == 3
    assert c.rope_scaling == RopeScaling("yarn", 40.0, 4096, 32.0, 1.0, 1.0, 1.0)
    assert c.quantization == QuantConfig(weight_block_size=(128, 128)) and c.fp8
    assert c.num_nextn_predict_layers == 1 and c.scale_fmt is None
    assert c.source == str(HF_V3)


def test_softmax_scale_yarn():
    c = ModelConfig.from_json(HF_V3)
    mscale = 0.1 * 1.0 * math.log(40) + 1.0
    assert c.softmax_scale == pytest.approx(192**-0.5 * mscale * mscale, rel=1e-12)
    plain = c.replace(rope_scaling=None)
    assert plain.softmax_scale == pytest.approx(192**-0.5, rel=1e-12)
    no_stretch = c.replace(rope_scaling=RopeScaling(factor=1.0))
    assert no_stretch.softmax_scale == pytest.approx(192**-0.5, rel=1e-12)


def test_v3_formats_same_architecture():
    """The HF config.json and the reference ModelArgs JSON describe the same V3 architecture."""
    hf, ma = ModelConfig.from_json(HF_V3).architecture(), ModelConfig.from_json(MA_V3).architecture()
    # Not architecture, and absent from the ModelArgs format:
    #  - max_position_embeddings: HF states the YaRN-extended 163840 (= 4096 * 40); ModelArgs has
    #    max_seq_len (default 16384), the length the reference allocates caches for.
    #  - num_nextn_predict_layers: the MTP head exists in checkpoints but the reference inference
    #    format has no field for it (its model drops MTP).
    assert hf.pop("max_position_embeddings") == 163840 and ma.pop("max_position_embeddings") == 16384
    assert hf.pop("num_nextn_predict_layers") == 1 and ma.pop("num_nextn_predict_layers") == 0
    assert hf == ma
    a, b = ModelConfig.from_json(HF_V3), ModelConfig.from_json(MA_V3)
    assert a.softmax_scale == b.softmax_scale


def test_v2_lite_modelargs_defaults():
    c = ModelConfig.from_json(MA_V2L)
    assert (c.hidden_size, c.num_hidden_layers, c.q_lora_rank, c.n_shared_experts) == (2048, 27, 0, 2)
    assert c.scoring_func == "softmax" and not c.norm_topk_prob and c.topk_method == "greedy"
    assert (c.n_group, c.topk_group, c.routed_scaling_factor) == (1, 1, 1.0)
    assert not c.uses_group_limit
    assert c.rope_scaling == RopeScaling("yarn", 40.0, 4096, 32.0, 1.0, 0.707, 0.707)
    assert c.max_position_embeddings == 16384 and c.quantization is None
    mscale = 0.1 * 0.707 * math.log(40) + 1.0
    assert c.softmax_scale == pytest.approx(192**-0.5 * mscale**2, rel=1e-12)


def test_modelargs_no_yarn_when_seq_fits(tmp_path):
    d = _ma() | {"max_seq_len": 4096}
    c = ModelConfig.from_json(_write(tmp_path, d))
    assert c.rope_scaling is None and c.softmax_scale == pytest.approx(192**-0.5)


def test_extra_keys_ignored_and_nulls(tmp_path):
    d = _hf() | {"some_future_key": [1, 2], "q_lora_rank": None, "transformers_version": "4.99"}
    c = ModelConfig.from_json(_write(tmp_path, d))
    assert c.q_lora_rank == 0


def test_scale_fmt_from_quantization_config(tmp_path):
    d = _hf()
    d["quantization_config"]["scale_fmt"] = "ue8m0"
    assert ModelConfig.from_json(_write(tmp_path, d)).scale_fmt == "ue8m0"


def test_from_dict_and_name(tmp_path):
    c = ModelConfig.from_dict(_hf(), source="mine")
    assert c.source == "mine" and c.name == "deepseek_v3"
    d = tmp_path / "my-model"
    d.mkdir()
    assert ModelConfig.from_json(_write(d, _hf())).name == "my-model"


def test_config_is_hashable_and_frozen():
    c = ModelConfig.named("deepseek-v3-tiny")
    assert hash(c) == hash(ModelConfig.named("deepseek-v3-tiny"))
    with pytest.raises(AttributeError):
        c.hidden_size = 1  # type: ignore[misc]


# ---- built-in names -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_named(name):
    c = ModelConfig.named(name)
    assert c.name == name


def test_named_v3_matches_file():
    assert ModelConfig.named("deepseek-v3").architecture() == ModelConfig.from_json(HF_V3).architecture()


def test_tiny():
    c = ModelConfig.named("deepseek-v3-tiny")
    assert (c.hidden_size, c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank) == (256, 4, 128, 128)
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (32, 32, 32)
    assert (c.n_routed_experts, c.n_group, c.num_experts_per_tok, c.topk_group) == (16, 4, 4, 2)
    assert (c.n_shared_experts, c.moe_intermediate_size, c.intermediate_size) == (1, 128, 512)
    assert (c.num_hidden_layers, c.first_k_dense_replace, c.vocab_size) == (2, 1, 1024)
    assert c.num_nextn_predict_layers == 1 and c.scoring_func == "sigmoid" and c.routed_scaling_factor == 2.5
    assert c.rope_scaling == ModelConfig.named("deepseek-v3").rope_scaling
    assert c.max_position_embeddings == 4096 and c.uses_group_limit
    assert [c.is_moe_layer(i) for i in range(2)] == [False, True]


def test_named_unknown_lists_known():
    with pytest.raises(ConfigError) as e:
        ModelConfig.named("deepseek-v4")
    msg = str(e.value)
    assert "deepseek-v4" in msg and all(n in msg for n in BUILTIN_NAMES)


# ---- bad inputs ---------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    p = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_json(p)
    assert str(p) in str(e.value) and e.value.hint


def test_directory_not_file(tmp_path):
    with pytest.raises(ConfigError, match="not a file"):
        ModelConfig.from_json(tmp_path)


def test_not_json(tmp_path):
    p = _write(tmp_path, '{"hidden_size": 7168,')
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_json(p)
    assert "not valid JSON" in str(e.value) and str(p) in str(e.value)


@pytest.mark.parametrize("data", ["[1, 2]", '"a string"', "3"])
def test_not_an_object(tmp_path, data):
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_json(_write(tmp_path, data))


def test_unknown_format(tmp_path):
    with pytest.raises(ConfigError, match="format not recognized"):
        ModelConfig.from_json(_write(tmp_path, {"foo": 1}))


def test_mixed_format(tmp_path):
    with pytest.raises(ConfigError, match="mixes formats"):
        ModelConfig.from_json(_write(tmp_path, _hf() | {"dim": 7168}))


def _edit(base: dict, key: str, value) -> dict:
    d = copy.deepcopy(base)
    node = d
    *parents, leaf = key.split(".")
    for k in parents:
        node = node[k]
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return d


_DELETE = object()

# (format, dotted key, bad value, field name expected in the message)
BAD = [
    ("hf", "hidden_size", _DELETE, "hidden_size"),
    ("hf", "vocab_size", _DELETE, "vocab_size"),
    ("hf", "kv_lora_rank", _DELETE, "kv_lora_rank"),
    ("hf", "hidden_size", "7168", "hidden_size"),
    ("hf", "hidden_size", 7168.0, "hidden_size"),
    ("hf", "hidden_size", True, "hidden_size"),
    ("hf", "num_attention_heads", None, "num_attention_heads"),
    ("hf", "num_hidden_layers", 0, "num_hidden_layers"),
    ("hf", "intermediate_size", -5, "intermediate_size"),
    ("hf", "n_shared_experts", -1, "n_shared_experts"),
    ("hf", "rms_norm_eps", 0, "rms_norm_eps"),
    ("hf", "rms_norm_eps", "1e-6", "rms_norm_eps"),
    ("hf", "rope_theta", -1.0, "rope_theta"),
    ("hf", "routed_scaling_factor", False, "routed_scaling_factor"),
    ("hf", "norm_topk_prob", 1, "norm_topk_prob"),
    ("hf", "scoring_func", "relu", "scoring_func"),
    ("hf", "scoring_func", 3, "scoring_func"),
    ("hf", "topk_method", "best", "topk_method"),
    ("hf", "num_experts_per_tok", 300, "num_experts_per_tok"),
    ("hf", "n_group", 7, "n_group"),
    ("hf", "topk_group", 9, "topk_group"),
    ("hf", "num_experts_per_tok", 0, "num_experts_per_tok"),
    ("hf", "first_k_dense_replace", 62, "first_k_dense_replace"),
    ("hf", "qk_rope_head_dim", 63, "qk_rope_head_dim"),
    ("hf", "rope_scaling", "yarn", "rope_scaling"),
    ("hf", "rope_scaling.factor", "40", "rope_scaling.factor"),
    ("hf", "rope_scaling.factor", 0, "rope_scaling.factor"),
    ("hf", "rope_scaling.type", "linear", "rope_scaling.type"),
    ("hf", "rope_scaling.original_max_position_embeddings", _DELETE,
     "rope_scaling.original_max_position_embeddings"),
    ("hf", "quantization_config.weight_block_size", [128], "weight_block_size"),
    ("hf", "quantization_config.quant_method", "int4", "quantization_config"),
    ("hf", "scale_fmt", "e8m0", "scale_fmt"),
    ("hf", "hidden_act", "gelu", "hidden_act"),
    ("hf", "moe_layer_freq", 2, "moe_layer_freq"),
    ("hf", "max_position_embeddings", 0, "max_position_embeddings"),
    ("ma", "dim", _DELETE, "dim"),
    ("ma", "n_layers", "61", "n_layers"),
    ("ma", "n_heads", 128.5, "n_heads"),
    ("ma", "n_activated_experts", 257, "num_experts_per_tok"),
    ("ma", "n_expert_groups", 3, "n_group"),
    ("ma", "n_limited_groups", 16, "topk_group"),
    ("ma", "score_func", "tanh", "scoring_func"),
    ("ma", "route_scale", "2.5", "route_scale"),
    ("ma", "dtype", "int8", "dtype"),
    ("ma", "q_lora_rank", -1, "q_lora_rank"),
    ("ma", "max_seq_len", True, "max_seq_len"),
]


@pytest.mark.parametrize("fmt,key,value,field", BAD, ids=[f"{b[0]}-{b[1]}-{b[2]!r}" for b in BAD])
def test_bad_field(tmp_path, fmt, key, value, field):
    d = _edit(_hf() if fmt == "hf" else _ma(), key, value)
    p = _write(tmp_path, d)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_json(p)
    err = e.value
    msg = str(err)
    assert field in msg, msg
    assert str(p) in msg, msg
    assert err.hint, msg
    if value is not _DELETE:
        assert repr(value) in msg or str(value) in msg, msg


def test_kept_groups_too_small(tmp_path):
    d = _hf() | {"n_group": 64, "topk_group": 1}  # one kept group of 4 experts < 8 per token
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        ModelConfig.from_json(_write(tmp_path, d))


def test_replace_validates():
    c = ModelConfig.named("deepseek-v3-tiny")
    assert c.replace(num_hidden_layers=1, first_k_dense_replace=1).num_hidden_layers == 1
    with pytest.raises(ConfigError, match="topk_group"):
        c.replace(topk_group=5)


def test_errors_are_dsr_errors_and_picklable(tmp_path):
    with pytest.raises(DsrError) as e:
        ModelConfig.from_json(_write(tmp_path, _hf() | {"hidden_size": "x"}))
    back = pickle.loads(pickle.dumps(e.value))
    assert str(back) == str(e.value) and isinstance(back, ConfigError)


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_dict([1, 2], source="x")
