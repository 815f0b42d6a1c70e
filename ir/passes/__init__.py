"""IR passes and the default PIPELINE (pure Graph -> Graph functions, run by the manager)."""
from .autodiff import GradError, differentiate
from .cleanup import FOLD_RULES, cse, dce, fold_constants
from .fuse import fuse
from .manager import PassContext, PassRecord, run_passes
from .vocab_loss import rewrite_vocab_loss
from .quantize_fp8 import Fp8Policy, quantize_fp8
from .absorb_mla import absorb_mla

PIPELINE = [
    ("rewrite_vocab_loss", rewrite_vocab_loss),   # log_softmax(LM head)[target] -> token_logprobs
    ("differentiate", differentiate),             # grads of the loss when options["grad_wrt"]; drops stop_gradient
    ("cse", cse),
    ("fold_constants", fold_constants),
    ("dce", dce),
    ("absorb_mla", absorb_mla),                   # MLA decode: q.W_UK against the latent cache (options["mla"])
    ("quantize_fp8", quantize_fp8),
    ("fuse", fuse),
]

__all__ = ["FOLD_RULES", "absorb_mla", "Fp8Policy", "GradError", "PIPELINE", "differentiate", "rewrite_vocab_loss", "PassContext", "PassRecord", "cse", "dce", "fold_constants",
           "fuse", "quantize_fp8", "run_passes"]
