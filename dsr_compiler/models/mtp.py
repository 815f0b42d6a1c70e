"""Eager Multi-Token Prediction (DeepSeek-V3 §2.2): the MTP module, its loss, and a pre-norm hidden helper.

Where it sits: the eager reference for ``--module mtp`` (DESIGN.md §4) and what the frontend traces.
Like the rest of the zoo it is plain tensor code: input checks are skipped while FX traces (inputs
are ``Proxy`` objects) and nothing depends on tensor values.

One MTP depth (:class:`MTPModule`, ``depth_index`` 0-based, ``num_nextn_predict_layers`` = D depths)::

    x     = eh_proj(concat(enorm(embed(t_{i+1})), hnorm(h_i)))     # embedding FIRST, as checkpoints store it
    h_out = DecoderLayer(x)                                        # an MoE layer (id num_hidden_layers + depth)
    logits = head(shared_head.norm(h_out))                          # the main model's LM head

The embedding and the LM head are the main model's (shared weights): they are passed to
``forward`` and never owned by the MTP module, so its ``state_dict`` holds only its own tensors
(``eh_proj``, ``enorm``, ``hnorm``, ``layer.*``, ``shared_head.norm``). ``weights.py`` maps the HF
checkpoint names (``model.layers.{n}.eh_proj.weight``, ``...self_attn.*``) onto these.

Loss semantics (:func:`mtp_loss`), with tokens ``t_0 .. t_{S-1}`` per sequence:

* Depth ``k`` (1-based) predicts ``t_{i+k+1}`` at position ``i`` from ``h^{k-1}_i`` and the
  embedding of ``t_{i+k}``. ``h^0`` is the main model's last decoder-layer output BEFORE the final
  norm (:func:`final_hidden`); ``h^k`` is depth k's decoder-layer output, also before its
  ``shared_head.norm`` (the norm belongs to the output head, as the main model's final norm
  does). Depths run sequentially: depth k consumes depth k-1's ``h_out``.
* Valid positions: ``i < L_k = S - 1 - k`` (the target must exist), i.e. the main model's S-1
  next-token positions less the last k, as in the paper (``h^k_{1:T-k}``). Depth k runs on the
  first ``L_k`` positions only; with causal attention and per-token routing this equals running
  the full (rolled, padded) sequence and masking the tail, as Megatron-LM's MTP does. RoPE
  positions start at 0 at every depth (attention is relative, so the paper's/Megatron's shifted
  position ids give the same result).
* ``CE_k``: token-level mean over the valid positions of the whole batch (HF ``ForCausalLMLoss``
  with ``ignore_index``, Megatron ``sum(loss_mask * ce) / num_tokens``): logits are produced in the
  module dtype, upcast to fp32 (fp64 stays fp64), ``-log_softmax(logits)[target]``. With ``mask``
  (``[B, S]``, bool/int/float, aligned with ``tokens``: token j counts as a target iff
  ``mask[b, j] != 0``, float values weight it): ``CE_k = sum(m * nll) / max(sum(m), 1)``; masked
  positions contribute exactly 0 even if non-finite. A depth with no valid position (``S <= k + 1``
  or all masked) contributes exactly 0.
* ``L_MTP = (lam / D) * sum_k CE_k`` (DeepSeek-V3: lam 0.3, later 0.1). The main next-token loss is
  not included; add it yourself (``model.head(model.norm(h0))`` are the main logits).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.fx
from torch import nn

from dsr_compiler.errors import DsrError
from dsr_compiler.models.config import ModelConfig
from dsr_compiler.models.deepseek import DecoderLayer
from dsr_compiler.models.grpo import per_token_logps
from dsr_compiler.models.layers import RMSNorm

__all__ = ["MTPModule", "MTPLoss", "mtp_loss", "mtp_cross_entropies", "final_hidden", "make_mtp_modules"]

# FX patches wrapped functions per module globals: keep the chunked-vocabulary log-prob one node here too.
torch.fx.wrap("per_token_logps")


class _SharedHead(nn.Module):
    """Holds ``norm`` only: HF's ``shared_head.head`` is the main model's LM head, passed at forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(nn.Module):
    """One MTP depth: ``eh_proj(concat(enorm(embed(t)), hnorm(h)))`` -> decoder layer -> ``shared_head.norm`` -> head.

    ``depth_index`` is 0-based (the first MTP depth is 0); its decoder layer has id
    ``num_hidden_layers + depth_index`` (always an MoE layer) and its checkpoint prefix is
    ``model.layers.{num_hidden_layers + depth_index}.``.
    """

    def __init__(self, cfg: ModelConfig, depth_index: int = 0, absorb: bool = False) -> None:
        super().__init__()
        if isinstance(depth_index, bool) or not isinstance(depth_index, int) or depth_index < 0:
            raise DsrError(f"depth_index must be an int >= 0, got {depth_index!r}", where="MTPModule",
                           hint="the first MTP depth is 0, the k-th is k - 1")
        self.cfg = cfg
        self.depth_index = depth_index
        self.layer_id = cfg.num_hidden_layers + depth_index
        h = cfg.hidden_size
        self.enorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.layer = DecoderLayer(cfg, self.layer_id, absorb)
        self.shared_head = _SharedHead(cfg)

    def extra_repr(self) -> str:
        return f"depth_index={self.depth_index}, layer_id={self.layer_id}"

    @property
    def checkpoint_prefix(self) -> str:
        """Where an HF DeepSeek-V3 checkpoint stores this depth: ``model.layers.{num_hidden_layers + depth}.``."""
        return f"model.layers.{self.layer_id}."

    def hidden(self, h: torch.Tensor, next_tokens: torch.Tensor, embed: nn.Module,
               start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """``h_out [B, S, H]``: the decoder-layer output before ``shared_head.norm`` (the next depth's input)."""
        if not isinstance(h, torch.fx.Proxy):
            self._check(h, next_tokens, embed, None)
        e = embed(next_tokens)
        x = self.eh_proj(torch.cat([self.enorm(e), self.hnorm(h)], dim=-1))
        return self.layer(x, start_pos)

    def forward(self, h: torch.Tensor, next_tokens: torch.Tensor, embed: nn.Module, head: nn.Module,
                start_pos: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, S, vocab], h_out [B, S, H])`` from ``h [B, S, H]`` and ``next_tokens [B, S]``.

        ``h[:, i]`` is the previous depth's representation of token i (the main model's pre-norm
        final hidden for the first depth) and ``next_tokens[:, i]`` the token it is combined with
        (``t_{i+k}`` at depth k); ``logits[:, i]`` predict the token after that one.
        """
        if not isinstance(h, torch.fx.Proxy):
            self._check(h, next_tokens, embed, head)
        h_out = self.hidden(h, next_tokens, embed, start_pos)
        return head(self.shared_head.norm(h_out)), h_out

    def _check(self, h, next_tokens, embed, head) -> None:
        where = "MTPModule.forward"
        hs = self.cfg.hidden_size
        if not isinstance(h, torch.Tensor) or h.dim() != 3 or h.size(-1) != hs or not h.is_floating_point():
            raise DsrError(f"bad h for {where}: expected a floating tensor [B, S, {hs}], got {_shape(h)}",
                           where=where, hint="pass the previous depth's hidden states (the main model's "
                                             "pre-norm final hidden for depth 0; see final_hidden)")
        if (not isinstance(next_tokens, torch.Tensor) or next_tokens.dtype not in (torch.int64, torch.int32)
                or tuple(next_tokens.shape) != tuple(h.shape[:2])):
            got = f"{_shape(next_tokens)} {next_tokens.dtype}" if isinstance(next_tokens, torch.Tensor) \
                else _shape(next_tokens)
            raise DsrError(f"bad next_tokens for {where}: expected integer tokens {list(h.shape[:2])}, got {got}",
                           where=where, hint="next_tokens[:, i] is the token combined with h[:, i] (t_{i+k} "
                                             "at depth k)")
        if not isinstance(embed, nn.Module) or (head is not None and not isinstance(head, nn.Module)):
            raise DsrError("MTPModule needs the main model's embedding and LM head modules", where=where,
                           hint="pass model.embed and model.head (MTP shares them with the main model)")


def make_mtp_modules(cfg: ModelConfig, depths: int | None = None, absorb: bool = False) -> nn.ModuleList:
    """``depths`` (default ``cfg.num_nextn_predict_layers``) :class:`MTPModule` s, depth indices 0, 1, ..."""
    d = cfg.num_nextn_predict_layers if depths is None else depths
    return nn.ModuleList(MTPModule(cfg, i, absorb) for i in range(d))


def final_hidden(model: nn.Module, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
    """The main model's last decoder-layer output ``[B, S, H]`` BEFORE its final norm (MTP's ``h^0``).

    Runs ``model.embed`` and ``model.layers`` exactly as ``DeepSeekModel.forward`` does, so
    ``model.head(model.norm(final_hidden(model, t))) == model(t)``; compute the main logits from
    it to run the trunk once for both losses.
    """
    if not isinstance(tokens, torch.fx.Proxy) and hasattr(model, "_check_tokens"):
        model._check_tokens(tokens)
    h = model.embed(tokens)
    for layer in model.layers:
        h = layer(h, start_pos)
    return h


# ---- the loss -----------------------------------------------------------------------------------
def _shape(x) -> str:
    return str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_loss_inputs(main_hidden, tokens, embed, head, mtp_modules, lam, mask, where: str) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        got = f"{_shape(tokens)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else _shape(tokens)
        raise DsrError(f"tokens must be integer ids [B, S], got {got}", where=where,
                       hint="pass the token ids the main model ran on (int64)")
    b, s = tokens.shape
    if (not isinstance(main_hidden, torch.Tensor) or main_hidden.dim() != 3 or not main_hidden.is_floating_point()
            or tuple(main_hidden.shape[:2]) != (b, s)):
        raise DsrError(f"main_hidden must be a floating tensor [{b}, {s}, H], got {_shape(main_hidden)}",
                       where=where, hint="pass final_hidden(model, tokens): the last layer's output before "
                                         "the final norm")
    if not isinstance(embed, nn.Module) or not isinstance(head, nn.Module) \
            or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise DsrError("the main model's embed and head modules are needed", where=where,
                       hint="pass a DeepSeekModel (its .embed and .head are shared with the MTP depths)")
    if isinstance(mtp_modules, nn.Module) and not isinstance(mtp_modules, nn.ModuleList):
        mtp_modules = [mtp_modules]
    mods = list(mtp_modules) if isinstance(mtp_modules, (list, tuple, nn.ModuleList)) else None
    if not mods or not all(isinstance(m, MTPModule) for m in mods):
        raise DsrError(f"mtp_modules must be a non-empty list of MTPModule, got {mtp_modules!r:.80}", where=where,
                       hint="build them with make_mtp_modules(cfg) (one per num_nextn_predict_layers)")
    for k, m in enumerate(mods):
        if m.cfg.hidden_size != main_hidden.size(-1):
            raise DsrError(f"MTP depth {k} has hidden size {m.cfg.hidden_size}, main_hidden has "
                           f"{main_hidden.size(-1)}", where=where, hint="build the MTP modules from the model's config")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise DsrError(f"lam must be a finite number >= 0, got {lam!r}", where=where,
                       hint="DeepSeek-V3 weighs the MTP loss with 0.3 (0.1 late in training)")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, s) or mask.is_complex():
            raise DsrError(f"mask must be [{b}, {s}] (bool, int or float) or None, got {_shape(mask)}",
                           where=where, hint="mask[b, j] != 0: token j counts as a prediction target")
        if mask.device != tokens.device:
            raise DsrError(f"mask on {mask.device}, tokens on {tokens.device}", where=where,
                           hint="move the inputs to one device")
    if main_hidden.device != tokens.device:
        raise DsrError(f"main_hidden on {main_hidden.device}, tokens on {tokens.device}", where=where,
                       hint="move the inputs to one device")


def _as_list(mtp_modules) -> list:
    if isinstance(mtp_modules, nn.Module) and not isinstance(mtp_modules, nn.ModuleList):
        return [mtp_modules]
    return list(mtp_modules)


def _depth_ce(logp: torch.Tensor, weight: torch.Tensor | None, raw_mask: torch.Tensor | None) -> torch.Tensor:
    """Token mean of ``-logp`` over the batch, optionally weighted by a mask (masked tokens give exactly 0)."""
    nll = -logp
    if weight is None:
        return nll.sum() / max(nll.numel(), 1)
    nll = torch.where(raw_mask != 0, nll, 0.0) * weight
    return nll.sum() / weight.sum().clamp(min=1.0)


def mtp_cross_entropies(main_hidden: torch.Tensor, tokens: torch.Tensor, embed: nn.Module, head: nn.Module,
                        mtp_modules: Sequence[MTPModule], mask: torch.Tensor | None = None,
                        start_pos: int | torch.Tensor = 0) -> list[torch.Tensor]:
    """``[CE_1, ..., CE_D]``: the per-depth cross-entropies of :func:`mtp_loss` (fp32; fp64 for fp64 models)."""
    mods = _as_list(mtp_modules)
    s = tokens.size(1)
    h = main_hidden
    ces: list[torch.Tensor] = []
    for k, mod in enumerate(mods, start=1):
        n_valid = s - 1 - k
        if n_valid <= 0:  # no target exists at this depth (nor deeper): exactly 0
            ces.append(torch.zeros((), dtype=torch.float64 if main_hidden.dtype == torch.float64
                                   else torch.float32, device=main_hidden.device))
            continue
        h = mod.hidden(h[:, :n_valid], tokens[:, k:k + n_valid], embed, start_pos)
        targets = tokens[:, k + 1:k + 1 + n_valid]
        logp = per_token_logps(mod.shared_head.norm(h), head.weight, targets)   # [B, L_k]
        if mask is None:
            ces.append(_depth_ce(logp, None, None))
        else:
            raw = mask[:, k + 1:k + 1 + n_valid]
            ces.append(_depth_ce(logp, raw.to(logp.dtype), raw))
    return ces


def mtp_loss(main_hidden: torch.Tensor, tokens: torch.Tensor, model: nn.Module,
             mtp_modules: Sequence[MTPModule], lam: float = 0.3, mask: torch.Tensor | None = None,
             start_pos: int | torch.Tensor = 0) -> torch.Tensor:
    """DeepSeek-V3's MTP loss ``(lam / D) * sum_k CE_k`` (scalar; semantics in the module docstring).

    ``main_hidden [B, S, H]``: the main model's final hidden states before the final norm
    (:func:`final_hidden`); ``tokens [B, S]``: the ids it ran on; ``model``: anything with the shared
    ``embed`` and ``head`` (a :class:`DeepSeekModel`); ``mtp_modules``: the D depths in order;
    ``mask [B, S]`` optional target mask aligned with ``tokens``.
    """
    embed, head = getattr(model, "embed", None), getattr(model, "head", None)
    if not isinstance(main_hidden, torch.fx.Proxy):
        _check_loss_inputs(main_hidden, tokens, embed, head, mtp_modules, lam, mask, "mtp_loss")
    ces = mtp_cross_entropies(main_hidden, tokens, embed, head, mtp_modules, mask, start_pos)
    total = ces[0]
    for ce in ces[1:]:
        total = total + ce
    return total * (float(lam) / len(ces))


class MTPLoss(nn.Module):
    """:func:`mtp_loss` as a module owning everything it uses (traceable, one ``state_dict``).

    Registers the main model's ``embed`` and ``head`` (the same module objects: weights stay
    shared) and the MTP depths as ``mtp``. ``forward(main_hidden [B, S, H], tokens [B, S],
    mask=None)`` returns the scalar loss.
    """

    def __init__(self, model: nn.Module, mtp_modules: Sequence[MTPModule] | None = None, lam: float = 0.3) -> None:
        super().__init__()
        if mtp_modules is None:
            mtp_modules = make_mtp_modules(model.cfg)
        _check_loss_inputs(torch.zeros(1, 1, model.cfg.hidden_size), torch.zeros(1, 1, dtype=torch.long),
                           getattr(model, "embed", None), getattr(model, "head", None), mtp_modules, lam, None,
                           "MTPLoss")
        self.embed = model.embed
        self.head = model.head
        self.mtp = mtp_modules if isinstance(mtp_modules, nn.ModuleList) else nn.ModuleList(_as_list(mtp_modules))
        self.lam = float(lam)

    def extra_repr(self) -> str:
        return f"depths={len(self.mtp)}, lam={self.lam}"

    def forward(self, main_hidden: torch.Tensor, tokens: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return mtp_loss(main_hidden, tokens, self, self.mtp, self.lam, mask)
