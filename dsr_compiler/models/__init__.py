"""The model zoo: DeepSeek configs, eager modules and checkpoint loading.

Where it sits: the front door builds a :class:`ModelConfig` (``--model`` / ``--config``), constructs
one of these modules from it, and hands the module to the frontend to trace. The same modules are
the eager PyTorch reference that compiled results are checked against.
"""
from dsr_compiler.models import config, deepseek, grpo, layers, mtp, weights
from dsr_compiler.models.config import BUILTIN_NAMES, ModelConfig, QuantConfig, RopeScaling
from dsr_compiler.models.deepseek import MLA, DecoderLayer, DeepSeekModel, Gate, MoE
from dsr_compiler.models.layers import MLP, MLPBlock, RMSNorm, apply_rope, precompute_rope, rope_cos_sin
from dsr_compiler.models.grpo import GRPOLoss, group_advantages, per_token_logps
from dsr_compiler.models.mtp import MTPLoss, MTPModule, final_hidden, make_mtp_modules, mtp_cross_entropies, mtp_loss
from dsr_compiler.models.weights import load_state_dict_safetensors, save_safetensors

__all__ = [
    "BUILTIN_NAMES", "ModelConfig", "QuantConfig", "RopeScaling",
    "RMSNorm", "MLP", "MLPBlock", "apply_rope", "precompute_rope", "rope_cos_sin",
    "Gate", "MoE", "MLA", "DecoderLayer", "DeepSeekModel",
    "load_state_dict_safetensors", "save_safetensors",
    "GRPOLoss", "group_advantages", "per_token_logps",
    "MTPModule", "MTPLoss", "mtp_loss", "mtp_cross_entropies", "final_hidden", "make_mtp_modules",
    "config", "layers", "deepseek", "grpo", "mtp", "weights",
]
