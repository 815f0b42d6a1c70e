"""Loading HF-format DeepSeek checkpoints (safetensors) into the zoo modules.

Where it sits: beside the zoo; the front door calls :func:`load_state_dict_safetensors` before
tracing so compiled and eager runs see real weights. HF names (``model.layers.3.self_attn.q_a_proj.weight``)
are mapped segment by segment onto ours (``layers.3.attn.wq_a.weight``). FP8 weights
(``float8_e4m3fn`` + ``weight_scale_inv`` with one fp32 scale per 128x128 block) are dequantized on
load. Only ``safetensors`` is ever used to read files: never ``torch.load`` (pickles run code).

:func:`save_safetensors` writes the format directly (no numpy needed), for tests and examples.
"""
from __future__ import annotations

import ctypes
import json
import math
import struct
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from dsr_compiler.errors import DsrError
from dsr_compiler.ir.ops.fp8 import E4M3_MAX as FP8_MAX
from dsr_compiler.ir.ops.fp8 import SCALE_FLOOR

__all__ = ["load_state_dict_safetensors", "save_safetensors", "hf_to_ours", "ours_to_hf",
           "mtp_hf_to_ours", "mtp_ours_to_hf", "MTP_SHARED_NAMES",
           "quantize_fp8_blocks", "dequantize_fp8_blocks", "FP8_MAX"]

_SCALE_SUFFIX = "_scale_inv"

# HF name segment -> our name segment (DeepSeek-V3 reference names).
_HF_SEGMENTS = {
    "embed_tokens": "embed",
    "self_attn": "attn",
    "mlp": "ffn",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "q_proj": "wq",
    "q_a_proj": "wq_a",
    "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a",
    "kv_a_layernorm": "kv_norm",
    "kv_b_proj": "wkv_b",
    "o_proj": "wo",
    "gate_proj": "w1",
    "up_proj": "w3",
    "down_proj": "w2",
}
_OUR_SEGMENTS = {v: k for k, v in _HF_SEGMENTS.items()}


def hf_to_ours(name: str) -> str:
    """``model.layers.0.mlp.experts.3.gate_proj.weight`` -> ``layers.0.ffn.experts.3.w1.weight``."""
    if name == "lm_head.weight":
        return "head.weight"
    if name.startswith("model."):
        name = name[len("model."):]
    return ".".join(_HF_SEGMENTS.get(p, p) for p in name.split("."))


def ours_to_hf(name: str, prefix: str | None = None) -> str:
    """Inverse of :func:`hf_to_ours`; with ``prefix`` (e.g. ``model.layers.1.mlp.``) for a sub-module."""
    hf = ".".join(_OUR_SEGMENTS.get(p, p) for p in name.split("."))
    if prefix is not None:
        return prefix + hf
    return "lm_head.weight" if name == "head.weight" else "model." + hf


# MTP depths (DeepSeek-V3): depth d is stored as ``model.layers.{num_hidden_layers + d}.``. Its own
# ``eh_proj``, ``enorm``, ``hnorm`` and ``shared_head.norm`` keep their HF names in MTPModule; the
# decoder-layer tensors (``self_attn.*``, ``mlp.*``, the two layer norms) live under ``layer.``.
# ``embed_tokens.weight`` and ``shared_head.head.weight`` are copies of the main model's embedding
# and LM head, which MTPModule shares instead of owning (see load_state_dict_safetensors(shared=)).
_MTP_LAYER_SEGMENTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
MTP_SHARED_NAMES = {"embed_tokens.weight": "embed", "shared_head.head.weight": "head"}


def mtp_hf_to_ours(name: str) -> str:
    """An MTP layer's HF name without its prefix -> MTPModule's: ``self_attn.o_proj.weight`` -> ``layer.attn.wo.weight``."""
    parts = name.split(".")
    if parts[0] in _MTP_LAYER_SEGMENTS:
        return "layer." + ".".join(_HF_SEGMENTS.get(p, p) for p in parts)
    return name


def mtp_ours_to_hf(name: str, prefix: str = "") -> str:
    """Inverse of :func:`mtp_hf_to_ours`, with ``prefix`` (e.g. ``model.layers.61.``) prepended."""
    if name.startswith("layer."):
        return prefix + ".".join(_OUR_SEGMENTS.get(p, p) for p in name[len("layer."):].split("."))
    return prefix + name


# ---- FP8 blocks ---------------------------------------------------------------------------------
def quantize_fp8_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> ``(q float8_e4m3fn [N, K], scale_inv fp32 [ceil(N/b), ceil(K/b)])`` with ``w ~ q * s``.

    Per DESIGN.md §5: ``s = max(amax, 1e-4) / 448`` per block, ``q = cast(clamp(w / s, ±448))``.
    """
    n, k = w.shape
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    padded = torch.zeros(nb * block, kb * block, dtype=torch.float32)
    padded[:n, :k] = w.float()
    tiles = padded.view(nb, block, kb, block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp_min(SCALE_FLOOR) / FP8_MAX
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(nb * block, kb * block)[:n, :k].contiguous(), scale


def dequantize_fp8_blocks(q: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``q [N, K]`` fp8 times its block scale ``[ceil(N/b), ceil(K/b)]`` -> fp32 ``[N, K]``."""
    n, k = q.shape
    s = scale_inv.float().repeat_interleave(block, dim=0)[:n].repeat_interleave(block, dim=1)[:, :k]
    return q.float() * s


# ---- writing ------------------------------------------------------------------------------------
_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as a ``.safetensors`` file (names sorted, 8-byte aligned header)."""
    header: dict[str, object] = {}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _DTYPE_CODES:
            raise DsrError(f"cannot write tensor {name!r}: dtype {t.dtype} has no safetensors code",
                           where=str(path), hint=f"use one of {sorted(str(d) for d in _DTYPE_CODES)}")
        nbytes = t.numel() * t.element_size()
        blob = ctypes.string_at(t.data_ptr(), nbytes) if nbytes else b""
        header[name] = {"dtype": _DTYPE_CODES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        blobs.append(blob)
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)


# ---- loading ------------------------------------------------------------------------------------
def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise DsrError(f"no .safetensors files in {path}", where=str(path),
                           hint="point at a checkpoint file or a directory of *.safetensors shards")
        return files
    if not path.exists():
        raise DsrError(f"checkpoint not found: {path}", where=str(path),
                       hint="pass a .safetensors file or a directory holding the shards")
    return [path]


def _read(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for k in st.keys():
                    if k in out:
                        raise DsrError(f"tensor {k!r} appears in two checkpoint shards", where=str(f),
                                       hint="the shards of one checkpoint must not overlap")
                    out[k] = st.get_tensor(k)
        except DsrError:
            raise
        except Exception as e:  # safetensors raises its own error type for corrupt files
            raise DsrError(f"cannot read safetensors file {f}: {e}", where=str(f),
                           hint="is it a .safetensors file? (PyTorch .bin/.pt pickles are not read)") from None
    return out


def _listing(title: str, items: list[str], limit: int = 40) -> list[str]:
    if not items:
        return []
    lines = [f"    {title} ({len(items)}):"] + [f"      {s}" for s in items[:limit]]
    if len(items) > limit:
        lines.append(f"      ... and {len(items) - limit} more")
    return lines


def load_state_dict_safetensors(module: nn.Module, path: str | Path, prefix: str | None = None,
                                strict: bool = True, block: int = 128, *,
                                mtp: Sequence[nn.Module] | None = None,
                                shared: str | tuple[nn.Module, nn.Module] = "skip",
                                keep_fp8: bool = False) -> nn.Module:
    """Load an HF-format DeepSeek checkpoint (file or directory of shards) into ``module`` in place.

    ``prefix`` selects a sub-module's tensors and strips it (``model.layers.1.mlp.`` for a
    :class:`MoE`, ``model.layers.0.`` for a :class:`DecoderLayer`); without it the names are those
    of a whole :class:`DeepSeekModel`. FP8 weights are dequantized with their ``weight_scale_inv``
    and every float tensor is cast to the dtype of the parameter it fills (an int or bool tensor for a
    float parameter, or the reverse, is refused as invalid). Unknown (unless
    ``strict=False``), missing and mis-shaped tensors are reported together in one DsrError.
    Returns ``module``.

    Multi-Token Prediction (DeepSeek-V3 stores MTP depth d as ``model.layers.{num_hidden_layers + d}.``):

    * ``module`` an :class:`MTPModule`: ``prefix`` defaults to its own (``module.checkpoint_prefix``).
    * ``mtp=[MTPModule, ...]`` with a whole :class:`DeepSeekModel`: those layers load into the
      given depths (in order) instead of being unknown tensors.
    * ``shared``: what to do with the MTP layer's copies of the main model's embedding and LM head
      (``embed_tokens.weight``, ``shared_head.head.weight``), which MTPModule shares instead of
      owning. ``"skip"`` (default): not loaded, only shape-checked when present (the main model's
      ``embed``/``head`` are used). ``(embed, head)`` (an MTPModule loaded alone): load them into
      these modules (then they are required).

    ``keep_fp8=True`` also keeps each FP8 weight as stored: the owning module (e.g. the ``nn.Linear``
    whose ``weight`` it fills) gets non-persistent buffers ``weight_fp8`` (the float8_e4m3fn codes)
    and ``weight_scale_inv`` (fp32 block scales), next to the dequantized ``weight`` that eager runs
    use. ``dsr.compile(..., fp8=True)`` then feeds these codes and scales to its FP8 GEMMs as they are
    instead of re-quantizing the dequantized weight (dsr_compiler/params.py).
    """
    from dsr_compiler.models.mtp import MTPModule  # lazy: mtp.py imports the zoo, not this file

    path = Path(path)
    is_mtp = isinstance(module, MTPModule)
    mtp_list = _check_mtp_args(module, prefix, mtp, shared, is_mtp, MTPModule)
    if is_mtp and prefix is None:
        prefix = module.checkpoint_prefix
    raw = _read(_files(path))
    if prefix is not None:
        raw = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}

    # our name -> tensor to fill; for the shared embed/head copies, a key under "<shared>."
    expected: dict[str, torch.Tensor] = dict(module.state_dict())
    skip_shapes: dict[str, tuple[int, ...]] = {}  # HF names checked for shape but not loaded
    n_layers = len(module.layers) if mtp_list else 0
    for d, m in enumerate(mtp_list):
        expected.update({f"mtp.{d}.{k}": v for k, v in m.state_dict().items()})
    if is_mtp and isinstance(shared, tuple):
        for which in MTP_SHARED_NAMES.values():
            expected[f"<shared>.{which}.weight"] = shared[0 if which == "embed" else 1].weight
    vocab_shape = None
    if is_mtp:
        vocab_shape = (module.cfg.vocab_size, module.cfg.hidden_size)
    elif mtp_list:
        vocab_shape = tuple(module.head.weight.shape)

    def to_ours(hf_name: str) -> str | None:
        """Our key for an HF name (None: a shared copy that is only shape-checked)."""
        if is_mtp:
            if hf_name in MTP_SHARED_NAMES:
                if isinstance(shared, tuple):
                    return f"<shared>.{MTP_SHARED_NAMES[hf_name]}.weight"
                skip_shapes[hf_name] = vocab_shape
                return None
            return mtp_hf_to_ours(hf_name)
        if prefix is not None:
            return ".".join(_HF_SEGMENTS.get(p, p) for p in hf_name.split("."))
        if mtp_list:
            parts = hf_name.split(".", 3)
            if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() \
                    and n_layers <= int(parts[2]) < n_layers + len(mtp_list):
                d, rest = int(parts[2]) - n_layers, parts[3]
                if rest in MTP_SHARED_NAMES:
                    skip_shapes[hf_name] = vocab_shape
                    return None
                return f"mtp.{d}." + mtp_hf_to_ours(rest)
        return hf_to_ours(hf_name)

    def to_hf(ours: str) -> str:
        if ours.startswith("<shared>."):
            which = ours.split(".")[1]
            return next(prefix + h for h, w in MTP_SHARED_NAMES.items() if w == which)
        if is_mtp:
            return mtp_ours_to_hf(ours, prefix)
        if ours.startswith("mtp.") and mtp_list:
            _, d, rest = ours.split(".", 2)
            return mtp_ours_to_hf(rest, f"model.layers.{n_layers + int(d)}.")
        return ours_to_hf(ours, prefix)

    loaded: dict[str, torch.Tensor] = {}
    kept_fp8: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    unknown: list[str] = []
    bad_shape: list[str] = []
    bad_other: list[str] = []
    reported: set[str] = set()  # our names already listed as mis-shaped or invalid
    scales = {k for k in raw if k.endswith(_SCALE_SUFFIX)}
    for hf_name in sorted(raw):
        if hf_name in scales:
            weight_name = hf_name[: -len(_SCALE_SUFFIX)]
            if weight_name not in raw:
                unknown.append(f"{_show(hf_name, prefix)} (a scale without its weight)")
            continue
        t = raw[hf_name]
        ours = to_ours(hf_name)
        if ours is None:  # a shared embed/head copy that is not loaded: check its shape only
            if tuple(t.shape) != tuple(skip_shapes[hf_name]):
                bad_shape.append(f"{_show(hf_name, prefix)} (shared copy, not loaded): shape {tuple(t.shape)}, "
                                 f"expected {tuple(skip_shapes[hf_name])}")
            continue
        if ours not in expected:
            unknown.append(_show(hf_name, prefix))
            continue
        want = expected[ours]
        reported.add(ours)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            s = raw.get(hf_name + _SCALE_SUFFIX)
            if s is None:
                bad_other.append(f"{_show(hf_name, prefix)}: FP8 weight without its weight{_SCALE_SUFFIX}")
                continue
            if t.dim() != 2:
                bad_other.append(f"{_show(hf_name, prefix)}: FP8 tensor must be 2-D, got {tuple(t.shape)}")
                continue
            want_s = (math.ceil(t.shape[0] / block), math.ceil(t.shape[1] / block))
            if tuple(s.shape) != want_s:
                bad_shape.append(f"{_show(hf_name + _SCALE_SUFFIX, prefix)}: shape {tuple(s.shape)}, "
                                 f"expected {want_s} for a {tuple(t.shape)} weight in {block}x{block} blocks")
                continue
            if keep_fp8 and ours.endswith(".weight"):
                kept_fp8[ours] = (t.to(torch.float8_e4m3fn) if t.dtype != torch.float8_e4m3fn else t, s.float())
            t = dequantize_fp8_blocks(t, s, block)
        elif hf_name + _SCALE_SUFFIX in raw:
            bad_other.append(f"{_show(hf_name, prefix)}: has a {_SCALE_SUFFIX} but dtype {t.dtype} is not FP8")
            continue
        elif t.dtype.is_floating_point != want.dtype.is_floating_point or t.dtype.is_complex:
            # an int/bool tensor cast into a float weight (or the reverse) is not a checkpoint we understand
            bad_other.append(f"{_show(hf_name, prefix)} -> {ours}: dtype {t.dtype}, expected {want.dtype} "
                             f"({'a float' if want.dtype.is_floating_point else 'an integer'} tensor)")
            continue
        if tuple(t.shape) != tuple(want.shape):
            bad_shape.append(f"{_show(hf_name, prefix)} -> {ours}: shape {tuple(t.shape)}, "
                             f"expected {tuple(want.shape)}")
            continue
        loaded[ours] = t
    missing = sorted(k for k in expected if k not in loaded and k not in reported)
    if missing or bad_shape or bad_other or (unknown and strict):
        lines = (_listing("missing (module tensors the checkpoint lacks)",
                          [f"{to_hf(k)} -> {k}" for k in missing])
                 + _listing("mis-shaped", bad_shape)
                 + _listing("invalid", bad_other)
                 + (_listing("unknown (checkpoint tensors the module lacks)", unknown) if strict else []))
        counts = ", ".join(f"{n} {what}" for n, what in ((len(missing), "missing"), (len(bad_shape), "mis-shaped"),
                                                        (len(bad_other), "invalid"),
                                                        (len(unknown) if strict else 0, "unknown")) if n)
        what = type(module).__name__ + (f" + {len(mtp_list)} MTPModule" if mtp_list else "")
        raise DsrError(f"checkpoint does not match {what}: {counts} tensors",
                       where=f"    {path}\n" + "\n".join(lines),
                       hint="check that the config matches the checkpoint (layers, experts, ranks)"
                            + ("; pass prefix= to load one sub-module" if prefix is None else "")
                            + ("; strict=False ignores unknown tensors (e.g. MTP layers)"
                               if unknown and strict else "")
                            + ("; mtp=make_mtp_modules(cfg) loads the MTP layers "
                               "(model.layers.{num_hidden_layers + d}.*)"
                               if unknown and strict and prefix is None and not is_mtp else ""))
    with torch.no_grad():
        for name, t in loaded.items():
            expected[name].copy_(t.to(expected[name].dtype))
    for name, (q, s) in kept_fp8.items():
        if name not in loaded:
            continue
        owner = _owner_of(name[: -len(".weight")], module, mtp_list)
        if owner is not None:
            owner.register_buffer("weight_fp8", q.contiguous(), persistent=False)
            owner.register_buffer("weight_scale_inv", s.contiguous(), persistent=False)
    return module


def _owner_of(path: str, module: nn.Module, mtp_list: Sequence[nn.Module]) -> nn.Module | None:
    """The submodule at our name `path` (``mtp.{d}.`` names live in the MTP depths), or None."""
    if path.startswith("<shared>"):
        return None
    if path.startswith("mtp.") and mtp_list:
        _, d, rest = path.split(".", 2)
        module, path = mtp_list[int(d)], rest
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _check_mtp_args(module, prefix, mtp, shared, is_mtp: bool, mtp_cls) -> list:
    """Validate ``mtp=`` and ``shared=``; returns the MTP depths to load alongside a whole model."""
    where = "load_state_dict_safetensors"
    if not (shared == "skip" or (isinstance(shared, tuple) and len(shared) == 2
                                 and all(isinstance(getattr(m, "weight", None), torch.Tensor) for m in shared))):
        raise DsrError(f"shared must be 'skip' or an (embed, head) pair of modules, got {shared!r:.80}", where=where,
                       hint="'skip' leaves the MTP layer's embedding/LM-head copies to the main model; "
                            "(model.embed, model.head) loads them into those modules")
    if isinstance(shared, tuple) and not is_mtp:
        raise DsrError("shared=(embed, head) is for loading an MTPModule alone", where=where,
                       hint="a whole model loads its own embed/head; leave shared='skip' with mtp=")
    if mtp is None:
        return []
    mods = [mtp] if isinstance(mtp, nn.Module) and not isinstance(mtp, nn.ModuleList) else list(mtp)
    if not all(isinstance(m, mtp_cls) for m in mods):
        raise DsrError("mtp= must be a list of MTPModule", where=where,
                       hint="build them with make_mtp_modules(cfg)")
    if prefix is not None or is_mtp or not isinstance(getattr(module, "layers", None), nn.ModuleList) \
            or not isinstance(getattr(module, "head", None), nn.Module):
        raise DsrError("mtp= loads MTP depths alongside a whole DeepSeekModel (no prefix=)", where=where,
                       hint="load one MTPModule with load_state_dict_safetensors(mtp_module, path)")
    n = len(module.layers)
    for d, m in enumerate(mods):
        if m.layer_id != n + d:
            raise DsrError(f"mtp[{d}] is MTP depth {m.depth_index} (layer {m.layer_id}), expected layer {n + d}",
                           where=where, hint="pass the depths in order, built from the model's config "
                                             "(make_mtp_modules(cfg))")
    return mods


def _show(name: str, prefix: str | None) -> str:
    return name if prefix is None else prefix + name
