"""Decode steps as modules: what the compiler traces for `--module mla|decoder|model` (decode phase).

`MLA.decode`, `DecoderLayer.decode` and `DeepSeekModel.decode` are methods, and the model's takes
a list of per-layer cache pairs; a compiled module needs one `forward` over tensors. These
wrappers only re-plumb arguments (the math is the zoo's own decode, so eager outputs are the
reference as they are):

    DecodeStep(mla_or_layer)(x [B, S_new, H], kv_cache [B, S_max, kv_lora], pe_cache [B, S_max, rope],
                             start_pos i64[] or int)  -> (out, new_kv_cache, new_pe_cache)
    ModelDecodeStep(model)(tokens [B, S_new], kv_caches [L, B, S_max, kv_lora],
                           pe_caches [L, B, S_max, rope], start_pos i64[] or int)
                           -> (logits, new_kv_caches, new_pe_caches)

The caches come in and go out as values (the IR is SSA): the new caches are copies with the new
tokens' rows written, as in eager `decode`.

`start_pos`: compile with a 0-d int64 tensor example so that it stays a runtime input (a Python
int example is baked into the compiled graph, and a call with another int is refused). The
compiled step then takes a Python int or a tensor, like eager: a host-known position outside
`[0, S_max - S_new]` raises eager's DsrError before any launch; a device tensor's position is
checked by the cache-write kernel and reported by `CompiledModule.check()` (README, "Calling a
compiled module").
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["DecodeStep", "ModelDecodeStep"]


class DecodeStep(nn.Module):
    """`inner.decode(x, kv_cache, pe_cache, start_pos)` as `forward` (inner: MLA or DecoderLayer)."""

    def __init__(self, inner: nn.Module, absorb: bool | None = None) -> None:
        super().__init__()
        if not hasattr(inner, "decode"):
            raise TypeError(f"DecodeStep needs a module with a decode method (MLA, DecoderLayer), got "
                            f"{type(inner).__name__}")
        self.inner = inner
        self.absorb = absorb

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                start_pos: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.inner.decode(x, kv_cache, pe_cache, start_pos, self.absorb)


class ModelDecodeStep(nn.Module):
    """`model.decode(tokens, caches, start_pos)` with the per-layer caches stacked along dim 0."""

    def __init__(self, model: nn.Module, absorb: bool | None = None) -> None:
        super().__init__()
        self.model = model
        self.absorb = absorb

    def init_cache(self, batch: int, max_seq: int, dtype: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = self.model.init_cache(batch, max_seq, dtype)
        return torch.stack([kv for kv, _ in pairs]), torch.stack([pe for _, pe in pairs])

    def forward(self, tokens: torch.Tensor, kv_caches: torch.Tensor, pe_caches: torch.Tensor,
                start_pos: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = len(self.model.layers)
        logits, new = self.model.decode(tokens, [(kv_caches[i], pe_caches[i]) for i in range(n)], start_pos,
                                        self.absorb)
        return logits, torch.stack([kv for kv, _ in new]), torch.stack([pe for _, pe in new])
