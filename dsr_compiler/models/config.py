"""DeepSeek model configuration: the one description of a model's architecture.

Where it sits: the first thing the front door builds. ``dsrc --model NAME`` and ``--config PATH``
end here; the zoo modules (``layers.py``, ``deepseek.py``) are constructed from a :class:`ModelConfig`,
and the compiler reads the same object for routing, RoPE and FP8 policy decisions.

Two file formats are read, detected by their keys:

* the Hugging Face ``config.json`` of DeepSeek-V2/V3 (``hidden_size``, ``num_hidden_layers``, ...);
* the ``ModelArgs`` JSON of the DeepSeek-V3 reference inference code (``dim``, ``n_layers``, ...).

Attribute names are the Hugging Face ones. Unknown keys are ignored (HF configs carry many);
every known key is type-checked and every bad value raises :class:`ConfigError` naming the field,
the file, the value and a fix.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from dsr_compiler.errors import ConfigError

__all__ = ["BUILTIN_NAMES", "FIELD_LIMITS", "MAX_MATRIX_ELEMENTS", "ModelConfig", "QuantConfig", "RopeScaling",
           "parse_json", "weight_matrices"]

SPECS_DIR = Path(__file__).resolve().parent / "specs"

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SCALE_FMTS = (None, "ue8m0")
ROPE_SCALING_TYPES = ("yarn", "deepseek_yarn")


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """YaRN context extension as DeepSeek uses it (HF ``rope_scaling``; ModelArgs ``rope_factor``...)."""

    type: str = "yarn"
    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    @property
    def active(self) -> bool:
        """YaRN changes frequencies and the softmax scale only when it stretches the context."""
        return self.factor > 1.0


@dataclass(frozen=True, slots=True)
class QuantConfig:
    """Block-wise FP8 weights as published (HF ``quantization_config``; ModelArgs ``dtype: fp8``)."""

    method: str = "fp8"
    fmt: str = "e4m3"
    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The architecture of a DeepSeek-V2/V3-style model (HF ``config.json`` field names)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_shared_experts: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    scoring_func: str
    norm_topk_prob: bool
    topk_method: str
    first_k_dense_replace: int
    q_lora_rank: int  # 0: queries come from one projection ``wq`` (V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    num_nextn_predict_layers: int = 0
    scale_fmt: str | None = None
    quantization: QuantConfig | None = None
    # Where the config came from (a path or "builtin"); not part of the architecture.
    source: str = field(default="", compare=False)

    # ---- derived -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn_mscale(self) -> float:
        """Attention-logit correction of YaRN: ``0.1 * mscale_all_dim * ln(factor) + 1`` (else 1)."""
        rs = self.rope_scaling
        if rs is None or not rs.active or not rs.mscale_all_dim:
            return 1.0
        return 0.1 * rs.mscale_all_dim * math.log(rs.factor) + 1.0

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim ** -0.5``, times ``mscale**2`` under YaRN (DeepSeek-V3 reference MLA)."""
        return self.qk_head_dim**-0.5 * self.yarn_mscale**2

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def uses_group_limit(self) -> bool:
        """Whether routing first keeps ``topk_group`` of ``n_group`` groups (reference: n_groups > 1)."""
        return self.n_group > 1 and self.topk_method != "greedy"

    @property
    def fp8(self) -> bool:
        return self.quantization is not None

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.first_k_dense_replace

    def architecture(self) -> dict[str, Any]:
        """All fields but ``name`` and ``source``: what two configs must share to be the same model."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("name", "source")}

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed (e.g. fewer layers for a test)."""
        new = replace(self, **changes)
        new._validate()
        return new

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: str | Path, name: str | None = None) -> ModelConfig:
        """Read an HF ``config.json`` or a reference ``ModelArgs`` JSON (detected by its keys)."""
        p = Path(path)
        where = f"config file {p}"
        if not p.exists():
            raise ConfigError(f"config file not found: {p}", where=where,
                              hint="pass the path of a DeepSeek config.json, or use --model "
                                   f"with one of {', '.join(BUILTIN_NAMES)}")
        if not p.is_file():
            raise ConfigError(f"config path is not a file: {p}", where=where,
                              hint="pass the config.json file itself, not its directory")
        try:
            with p.open("rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)      # never more: the path may be a huge or endless file
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file: {e}", where=where,
                              hint="check the file's permissions and that it is UTF-8 text") from None
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file is larger than {MAX_CONFIG_BYTES:,} bytes", where=where,
                              hint="a DeepSeek config.json is a few KB; pass the config, not a weights file")
        data = parse_json(text, where, "a DeepSeek config.json is one JSON object")
        if name is None:
            name = p.parent.name if p.stem == "config" and p.parent.name else p.stem
        return cls.from_dict(data, source=str(p), name=name)

    @classmethod
    def from_dict(cls, d: Any, source: str = "<dict>", name: str | None = None) -> ModelConfig:
        """Build from a parsed HF ``config.json`` or ``ModelArgs`` mapping; ``source`` names it in errors."""
        where = _where(source)
        if not isinstance(d, Mapping):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}", where=where,
                              hint="a DeepSeek config is an object of fields such as "
                                   '{"hidden_size": 7168, ...}')
        fmt = _detect_format(d, where)
        reader = _Reader(d, where)
        kw = _from_hf(reader) if fmt == "hf" else _from_modelargs(reader)
        if name is None:
            name = str(d.get("name") or d.get("_name_or_path") or d.get("model_type") or "custom")
        cfg = cls(name=name, source=source, **kw)
        cfg._validate()
        return cfg

    @classmethod
    def named(cls, name: str) -> ModelConfig:
        """A built-in config: ``deepseek-v3``, ``deepseek-v2-lite`` or ``deepseek-v3-tiny``."""
        if not isinstance(name, str) or name not in BUILTIN_NAMES:
            raise ConfigError(f"unknown model name {name!r}", where="--model / ModelConfig.named",
                              hint=f"known names: {', '.join(BUILTIN_NAMES)}; or pass --config PATH "
                                   "to a DeepSeek config.json")
        if name == "deepseek-v3-tiny":
            return cls.from_dict(_TINY, source="builtin:deepseek-v3-tiny", name=name)
        return cls.from_json(SPECS_DIR / _BUILTIN_FILES[name], name=name)

    # ---- validation ----------------------------------------------------------------------------
    def _validate(self) -> None:
        where = _where(self.source)

        def bad(fld: str, why: str, hint: str) -> ConfigError:
            return ConfigError(f"invalid config field {fld!r} = {getattr(self, fld)!r}: {why}",
                               where=where, hint=hint)

        positive = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "n_routed_experts",
                    "num_experts_per_tok", "n_group", "topk_group", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")
        for f in positive:
            if getattr(self, f) <= 0:
                raise bad(f, "must be a positive integer", f"set {f} to a size > 0")
        for f in ("n_shared_experts", "q_lora_rank", "first_k_dense_replace", "num_nextn_predict_layers"):
            if getattr(self, f) < 0:
                raise bad(f, "must be >= 0", f"set {f} to 0 or more")
        for f in ("rms_norm_eps", "rope_theta", "routed_scaling_factor"):
            v = getattr(self, f)
            if not (v > 0 and math.isfinite(v)):
                raise bad(f, "must be a finite number > 0", f"set {f} to a positive number")
        if self.scoring_func not in SCORING_FUNCS:
            raise bad("scoring_func", "unknown scoring function",
                      f"use one of {', '.join(SCORING_FUNCS)} (DeepSeek-V3: sigmoid, V2: softmax)")
        if self.topk_method not in TOPK_METHODS:
            raise bad("topk_method", "unknown expert selection method", f"use one of {', '.join(TOPK_METHODS)}")
        if self.scale_fmt not in SCALE_FMTS:
            raise bad("scale_fmt", "unknown FP8 scale format", 'use null or "ue8m0"')
        if self.num_experts_per_tok > self.n_routed_experts:
            raise bad("num_experts_per_tok", f"more experts per token than n_routed_experts={self.n_routed_experts}",
                      "num_experts_per_tok must be <= n_routed_experts")
        if self.n_routed_experts % self.n_group:
            raise bad("n_group",
                      f"n_routed_experts={self.n_routed_experts} is not divisible into {self.n_group} groups",
                      "choose n_group dividing n_routed_experts")
        if self.topk_group > self.n_group:
            raise bad("topk_group", f"keeps more groups than n_group={self.n_group}",
                      "topk_group must be <= n_group")
        if self.uses_group_limit and self.num_experts_per_tok > self.topk_group * self.experts_per_group:
            raise bad("num_experts_per_tok",
                      f"the {self.topk_group} kept groups hold only {self.topk_group * self.experts_per_group} experts",
                      "raise topk_group or lower num_experts_per_tok")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise bad("first_k_dense_replace", f"more dense layers than num_hidden_layers={self.num_hidden_layers}",
                      "first_k_dense_replace must be <= num_hidden_layers")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "RoPE rotates pairs, so the rope dim must be even",
                      "use an even qk_rope_head_dim (DeepSeek: 64)")
        self._validate_limits(where)
        rs = self.rope_scaling
        if rs is not None:
            if rs.type not in ROPE_SCALING_TYPES:
                raise ConfigError(f"invalid config field 'rope_scaling.type' = {rs.type!r}: unsupported RoPE scaling",
                                  where=where, hint='DeepSeek uses "yarn"; remove rope_scaling for plain RoPE')
            for f in ("factor", "beta_fast", "beta_slow"):
                if not getattr(rs, f) > 0:
                    raise ConfigError(f"invalid config field 'rope_scaling.{f}' = {getattr(rs, f)!r}: must be > 0",
                                      where=where, hint=f"set rope_scaling.{f} to a positive number")
            for f in ("factor", "mscale", "mscale_all_dim"):
                if not math.isfinite(getattr(rs, f)):
                    raise ConfigError(f"invalid config field 'rope_scaling.{f}' = {getattr(rs, f)!r}: must be finite",
                                      where=where, hint=f"set rope_scaling.{f} to a finite number")
            if rs.original_max_position_embeddings <= 0:
                raise ConfigError("invalid config field 'rope_scaling.original_max_position_embeddings' = "
                                  f"{rs.original_max_position_embeddings!r}: must be > 0", where=where,
                                  hint="DeepSeek-V3 uses 4096")
        q = self.quantization
        if q is not None:
            if q.method != "fp8" or q.fmt != "e4m3":
                raise ConfigError(f"invalid config field 'quantization_config' = {q!r}: only fp8 e4m3 is supported",
                                  where=where, hint='use quant_method "fp8", fmt "e4m3", or no quantization')
            if len(q.weight_block_size) != 2 or min(q.weight_block_size) <= 0:
                raise ConfigError("invalid config field 'quantization_config.weight_block_size' = "
                                  f"{list(q.weight_block_size)!r}: must be two positive ints",
                                  where=where, hint="DeepSeek-V3 uses [128, 128]")


    def _validate_limits(self, where: str) -> None:
        """The supported sizes (FIELD_LIMITS), then every weight matrix within 32-bit offsets."""
        mats = weight_matrices(self)
        for f, limit in FIELD_LIMITS.items():
            v = getattr(self, f)
            if v > limit:
                shaped = [(n, r, c) for n, (r, c, fs) in mats.items() if f in fs]
                need = ""
                if shaped:
                    n, r, c = shaped[0]
                    need = f"; the weight {n} [{r}, {c}] alone would need {2 * r * c:,} bytes in bf16"
                raise ConfigError(f"invalid config field {f!r} = {v!r}: above the supported limit {limit:,}{need}",
                                  where=where, hint=f"set {f} to at most {limit:,} (see README, Limits)")
        for n, (r, c, fs) in mats.items():
            if r * c > MAX_MATRIX_ELEMENTS and n not in _INT64_INDEXED:
                raise ConfigError(f"config: weight {n} [{r}, {c}] has {r * c:,} elements "
                                  f"({2 * r * c:,} bytes in bf16), more than the {MAX_MATRIX_ELEMENTS:,} a kernel addresses with 32-bit offsets",
                                  where=where, hint=f"lower {' or '.join(fs)}")


# ---- supported limits -----------------------------------------------------------------------------
# Upper bounds of the size fields (DeepSeek-V3: vocab 129,280, hidden 7,168, 256 experts, 128 heads).
# The MoE router tiles over up to 65,536 experts; GEMM kernels address one weight matrix (one
# layer's, one expert's) with 32-bit offsets, hence MAX_MATRIX_ELEMENTS; the bounds also keep every
# product of sizes far from int64 overflow.
FIELD_LIMITS: dict[str, int] = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "moe_intermediate_size": 1 << 20,
    "num_hidden_layers": 1024, "num_attention_heads": 1024, "n_shared_experts": 256, "n_routed_experts": 1 << 16,
    "q_lora_rank": 1 << 16, "kv_lora_rank": 1 << 16, "qk_nope_head_dim": 1024, "qk_rope_head_dim": 1024,
    "v_head_dim": 1024, "max_position_embeddings": (1 << 31) - 1, "num_nextn_predict_layers": 16,
}
MAX_MATRIX_ELEMENTS = (1 << 31) - 1
_INT64_INDEXED = frozenset({"gate"})      # the MoE router addresses gate rows with 64-bit offsets
MAX_CONFIG_BYTES = 1 << 20      # a config file (DeepSeek-V3's is 1.7 KB)
MAX_JSON_DEPTH = 32             # nesting of objects/lists (a DeepSeek config nests 2 deep)


def weight_matrices(cfg: ModelConfig) -> dict[str, tuple[int, int, tuple[str, ...]]]:
    """Every weight matrix the zoo builds, as name -> (rows, cols, the fields that shape it);
    experts count once (they are stacked along a third, int64-indexed dimension)."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    heads_qk = ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim")
    m: dict[str, tuple[int, int, tuple[str, ...]]] = {
        "embed": (cfg.vocab_size, h, ("vocab_size", "hidden_size")),
        "mlp.w1": (cfg.intermediate_size, h, ("intermediate_size", "hidden_size")),
        "experts.w13": (2 * cfg.moe_intermediate_size, h, ("moe_intermediate_size", "hidden_size")),
        "shared_experts.w1": (cfg.n_shared_experts * cfg.moe_intermediate_size, h,
                              ("n_shared_experts", "moe_intermediate_size", "hidden_size")),
        "gate": (cfg.n_routed_experts, h, ("n_routed_experts", "hidden_size")),
        "attn.wkv_a": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h, ("kv_lora_rank", "qk_rope_head_dim", "hidden_size")),
        "attn.wkv_b": (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank,
                       ("num_attention_heads", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank")),
        "attn.wo": (h, nh * cfg.v_head_dim, ("hidden_size", "num_attention_heads", "v_head_dim")),
    }
    if cfg.num_nextn_predict_layers:
        m["mtp.eh_proj"] = (h, 2 * h, ("hidden_size",))
    if cfg.q_lora_rank:
        m["attn.wq_a"] = (cfg.q_lora_rank, h, ("q_lora_rank", "hidden_size"))
        m["attn.wq_b"] = (nh * qk, cfg.q_lora_rank, heads_qk + ("q_lora_rank",))
    else:
        m["attn.wq"] = (nh * qk, h, heads_qk + ("hidden_size",))
    return m


def parse_json(text: str, where: str, what: str) -> Any:
    """`json.loads` with bounds: at most MAX_JSON_DEPTH nesting levels (checked before parsing, so
    a deep file is not a RecursionError), no duplicate keys (json would keep the last silently), no
    NaN / Infinity literals (not JSON). Every failure is a ConfigError naming `where`."""
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ConfigError(f"JSON nests {depth} levels deep, more than the {MAX_JSON_DEPTH} supported", where=where,
                          hint=what)

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for k, v in items:
            if k in d:
                raise ConfigError(f"duplicate key {k!r} in JSON: the values {d[k]!r} and {v!r} disagree"
                                  if d[k] != v else f"duplicate key {k!r} in JSON", where=where,
                                  hint=f"keep one {k!r}; a JSON object names each key once")
            d[k] = v
        return d

    def constant(name: str) -> Any:
        raise ConfigError(f"{name} is not a JSON number", where=where, hint="write a finite number")
    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except json.JSONDecodeError as e:
        raise ConfigError(f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})", where=where,
                          hint=f"fix the JSON syntax; {what}") from None
    except RecursionError:   # the depth scan bounds this; kept so that no input can surface one
        raise ConfigError("JSON nests too deep", where=where, hint=what) from None


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def _json_depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings (a linear scan; malformed text is json's to report)."""
    depth = deepest = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


BUILTIN_NAMES = ("deepseek-v3", "deepseek-v2-lite", "deepseek-v3-tiny")
_BUILTIN_FILES = {"deepseek-v3": "deepseek-v3.hf-config.json", "deepseek-v2-lite": "deepseek-v2-lite.modelargs.json"}

# deepseek-v3-tiny: DeepSeek-V3's structure (MLA with q LoRA, sigmoid group-limited routing with a
# bias, shared expert, first layer dense, MTP, YaRN, FP8 blocks) at sizes the CPU interpreter runs
# in seconds. Written in HF format so it goes through the same reader and checks as a user file.
_TINY: dict[str, Any] = {
    "model_type": "deepseek_v3",
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "topk_method": "noaux_tc",
    "q_lora_rank": 128,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 32,
    "v_head_dim": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "max_position_embeddings": 4096,
    "num_nextn_predict_layers": 1,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]},
}


# ---- reading ------------------------------------------------------------------------------------
def _where(source: str) -> str:
    if source.startswith("builtin:") or source.startswith("<"):
        return f"config {source}"
    return f"config file {source}"


_HF_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "model_type")
_MODELARGS_KEYS = ("dim", "n_layers", "n_heads", "inter_dim")


def _detect_format(d: Mapping[str, Any], where: str) -> str:
    hf = [k for k in _HF_KEYS if k in d]
    ma = [k for k in _MODELARGS_KEYS if k in d]
    if hf and ma:
        raise ConfigError(f"config mixes formats: HF keys {hf} and ModelArgs keys {ma}", where=where,
                          hint="use either the Hugging Face config.json names (hidden_size, ...) "
                               "or the reference ModelArgs names (dim, ...), not both")
    if hf:
        return "hf"
    if ma:
        return "modelargs"
    raise ConfigError("config format not recognized: no 'hidden_size' (HF config.json) or 'dim' "
                      "(reference ModelArgs) field", where=where,
                      hint="pass a DeepSeek config.json (fields hidden_size, num_hidden_layers, ...) or "
                           "a ModelArgs JSON (fields dim, n_layers, ...)")


_MISSING = object()


class _Reader:
    """Typed field access over a raw mapping; every failure is a ConfigError naming the field."""

    def __init__(self, d: Mapping[str, Any], where: str, prefix: str = "") -> None:
        self.d, self.where, self.prefix = d, where, prefix

    def _raw(self, key: str, default: Any) -> Any:
        v = self.d.get(key, _MISSING)
        if v is _MISSING:
            if default is _MISSING:
                raise ConfigError(f"config field {self.prefix + key!r} is missing", where=self.where,
                                  hint=f"add \"{self.prefix + key}\" to the config")
            return default
        return v

    def _type_error(self, key: str, v: Any, want: str, example: str) -> ConfigError:
        return ConfigError(f"invalid config field {self.prefix + key!r} = {v!r}: expected {want}, "
                           f"got {type(v).__name__}", where=self.where, hint=f"write it as {example}")

    def integer(self, key: str, default: Any = _MISSING, none_as: Any = _MISSING) -> int:
        v = self._raw(key, default)
        if v is None and none_as is not _MISSING:
            return none_as
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._type_error(key, v, "an integer",
                                   f'"{self.prefix + key}": {_int_like(v)} (no quotes, no decimal point)')
        return v

    def number(self, key: str, default: Any = _MISSING) -> float:
        v = self._raw(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self._type_error(key, v, "a number", f'"{self.prefix + key}": 1.0')
        return float(v)

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        v = self._raw(key, default)
        if not isinstance(v, bool):
            raise self._type_error(key, v, "true or false", f'"{self.prefix + key}": true')
        return v

    def string(self, key: str, default: Any = _MISSING, allow_none: bool = False) -> str | None:
        v = self._raw(key, default)
        if v is None and allow_none:
            return None
        if not isinstance(v, str):
            raise self._type_error(key, v, "a string", f'"{self.prefix + key}": "..."')
        return v

    def sub(self, key: str) -> _Reader | None:
        v = self._raw(key, None)
        if v is None:
            return None
        if not isinstance(v, Mapping):
            raise self._type_error(key, v, "an object", f'"{self.prefix + key}": {{...}}')
        return _Reader(v, self.where, prefix=f"{self.prefix}{key}.")


def _int_like(v: Any) -> int:
    """The integer a mistyped value probably meant, for the hint (128 when there is none)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return 128
    return int(f) if math.isfinite(f) and f == int(f) and f > 0 else 128


# Defaults for HF fields that a config may omit, by model generation (DeepSeek-V2 vs V3 HF classes).
_HF_DEFAULTS = {
    "deepseek_v3": {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
                    "num_nextn_predict_layers": 1},
    "other": {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False,
              "num_nextn_predict_layers": 0},
}


def _from_hf(r: _Reader) -> dict[str, Any]:
    model_type = r.string("model_type", "deepseek_v3")
    dflt = _HF_DEFAULTS["deepseek_v3" if model_type == "deepseek_v3" else "other"]
    _check_unsupported_hf(r)
    kw: dict[str, Any] = dict(
        vocab_size=r.integer("vocab_size"),
        hidden_size=r.integer("hidden_size"),
        intermediate_size=r.integer("intermediate_size"),
        moe_intermediate_size=r.integer("moe_intermediate_size"),
        num_hidden_layers=r.integer("num_hidden_layers"),
        num_attention_heads=r.integer("num_attention_heads"),
        n_shared_experts=r.integer("n_shared_experts", 0, none_as=0),
        n_routed_experts=r.integer("n_routed_experts"),
        num_experts_per_tok=r.integer("num_experts_per_tok"),
        n_group=r.integer("n_group", 1, none_as=1),
        topk_group=r.integer("topk_group", 1, none_as=1),
        routed_scaling_factor=r.number("routed_scaling_factor", 1.0),
        scoring_func=r.string("scoring_func", dflt["scoring_func"]),
        norm_topk_prob=r.boolean("norm_topk_prob", dflt["norm_topk_prob"]),
        topk_method=r.string("topk_method", dflt["topk_method"]),
        first_k_dense_replace=r.integer("first_k_dense_replace", 0),
        q_lora_rank=r.integer("q_lora_rank", 0, none_as=0),
        kv_lora_rank=r.integer("kv_lora_rank"),
        qk_nope_head_dim=r.integer("qk_nope_head_dim"),
        qk_rope_head_dim=r.integer("qk_rope_head_dim"),
        v_head_dim=r.integer("v_head_dim"),
        rms_norm_eps=r.number("rms_norm_eps", 1e-6),
        rope_theta=r.number("rope_theta", 10000.0),
        max_position_embeddings=r.integer("max_position_embeddings", 4096),
        num_nextn_predict_layers=r.integer("num_nextn_predict_layers", dflt["num_nextn_predict_layers"]),
    )
    rs = r.sub("rope_scaling")
    if rs is not None:
        kw["rope_scaling"] = RopeScaling(
            type=rs.string("type", None, allow_none=True) or rs.string("rope_type", "yarn"),
            factor=rs.number("factor"),
            original_max_position_embeddings=rs.integer("original_max_position_embeddings"),
            beta_fast=rs.number("beta_fast", 32.0),
            beta_slow=rs.number("beta_slow", 1.0),
            mscale=rs.number("mscale", 1.0),
            mscale_all_dim=rs.number("mscale_all_dim", 0.0),
        )
    scale_fmt = r.string("scale_fmt", None, allow_none=True)
    qc = r.sub("quantization_config")
    if qc is not None:
        bs = qc._raw("weight_block_size", [128, 128])
        if (not isinstance(bs, list) or len(bs) != 2
                or any(isinstance(b, bool) or not isinstance(b, int) for b in bs)):
            raise ConfigError(f"config field 'quantization_config.weight_block_size' = {bs!r} must be a list of "
                              "two integers", where=r.where, hint='write it as "weight_block_size": [128, 128]')
        kw["quantization"] = QuantConfig(
            method=qc.string("quant_method", "fp8"), fmt=qc.string("fmt", "e4m3"),
            weight_block_size=(bs[0], bs[1]), activation_scheme=qc.string("activation_scheme", "dynamic"))
        scale_fmt = qc.string("scale_fmt", scale_fmt, allow_none=True)
    kw["scale_fmt"] = scale_fmt
    return kw


def _check_unsupported_hf(r: _Reader) -> None:
    """Refuse HF options this compiler would otherwise silently get wrong."""
    checks = (
        ("hidden_act", "silu", 'DeepSeek MLPs use SwiGLU: "hidden_act": "silu"'),
        ("attention_bias", False, "DeepSeek projections have no bias"),
        ("moe_layer_freq", 1, "every layer after first_k_dense_replace must be MoE (moe_layer_freq 1)"),
        ("tie_word_embeddings", False, "DeepSeek keeps a separate lm_head"),
    )
    for key, ok, hint in checks:
        v = r.d.get(key, ok)
        if v != ok or type(v) is not type(ok):
            raise ConfigError(f"config field {key!r} = {v!r} is not supported (expected {ok!r})",
                              where=r.where, hint=hint)


def _from_modelargs(r: _Reader) -> dict[str, Any]:
    """The DeepSeek-V3 reference ``ModelArgs``; absent fields take its defaults (specs/README.md).

    The sizes (dim, n_layers, ...) are required: the reference defaults for them are DeepSeek-V2-Lite's
    and silently taking them hides a wrong file.
    """
    score_func = r.string("score_func", "softmax")
    n_groups = r.integer("n_expert_groups", 1)
    max_seq_len = r.integer("max_seq_len", 16384)
    r.integer("max_batch_size", 8)  # type-checked, not architecture
    dtype = r.string("dtype", "bf16")
    if dtype not in ("bf16", "fp8"):
        raise ConfigError(f"config field 'dtype' = {dtype!r} is not bf16 or fp8", where=r.where,
                          hint='use "dtype": "bf16" or "dtype": "fp8"')
    original_seq_len = r.integer("original_seq_len", 4096)
    mscale = r.number("mscale", 1.0)
    rope_scaling = RopeScaling(
        type="yarn", factor=r.number("rope_factor", 40.0), original_max_position_embeddings=original_seq_len,
        beta_fast=r.number("beta_fast", 32.0), beta_slow=r.number("beta_slow", 1.0),
        # The reference has one `mscale` and uses it for the attention scale (HF: mscale_all_dim) and
        # does not rescale cos/sin (HF: mscale / mscale_all_dim == 1).
        mscale=mscale, mscale_all_dim=mscale)
    if score_func == "sigmoid":
        topk_method = "noaux_tc"
    else:
        topk_method = "group_limited_greedy" if n_groups > 1 else "greedy"
    return dict(
        vocab_size=r.integer("vocab_size"),
        hidden_size=r.integer("dim"),
        intermediate_size=r.integer("inter_dim"),
        moe_intermediate_size=r.integer("moe_inter_dim"),
        num_hidden_layers=r.integer("n_layers"),
        num_attention_heads=r.integer("n_heads"),
        n_shared_experts=r.integer("n_shared_experts"),
        n_routed_experts=r.integer("n_routed_experts"),
        num_experts_per_tok=r.integer("n_activated_experts"),
        n_group=n_groups,
        topk_group=r.integer("n_limited_groups", 1),
        routed_scaling_factor=r.number("route_scale", 1.0),
        scoring_func=score_func,
        # The reference renormalizes the selected weights for sigmoid scoring only.
        norm_topk_prob=score_func == "sigmoid",
        topk_method=topk_method,
        first_k_dense_replace=r.integer("n_dense_layers"),
        q_lora_rank=r.integer("q_lora_rank", 0),
        kv_lora_rank=r.integer("kv_lora_rank"),
        qk_nope_head_dim=r.integer("qk_nope_head_dim"),
        qk_rope_head_dim=r.integer("qk_rope_head_dim"),
        v_head_dim=r.integer("v_head_dim"),
        rms_norm_eps=1e-6,  # the reference RMSNorm's eps
        rope_theta=r.number("rope_theta", 10000.0),
        # The reference applies YaRN only when max_seq_len exceeds original_seq_len.
        rope_scaling=rope_scaling if max_seq_len > original_seq_len else None,
        max_position_embeddings=max_seq_len,
        num_nextn_predict_layers=0,  # the reference inference format has no MTP module
        scale_fmt=r.string("scale_fmt", None, allow_none=True),
        quantization=QuantConfig() if dtype == "fp8" else None,
    )
