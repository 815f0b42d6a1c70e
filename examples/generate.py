"""Example: greedy generation from a DeepSeek config.json + safetensors checkpoint with the compiled decode step.

    python examples/generate.py                                    # a tiny checkpoint written to a temp dir
    python examples/generate.py --config cfg.json --checkpoint ckpt/ [--prompt 1,2,3] [--new 3] [--max-seq 16]

Without arguments it first writes what a published DeepSeek-V3 checkpoint looks like, at tiny size
(deepseek-v3-tiny: 2 layers, MLA, the second layer routed MoE): a Hugging Face `config.json` and a
seeded `model.safetensors` in HF tensor names (`model.layers.0.self_attn.q_a_proj.weight`, ...), its
linear weights stored as FP8 blocks with `weight_scale_inv` like the published files. Then it does
what a user with a real checkpoint does:

    ModelConfig.from_json -> DeepSeekModel -> load_state_dict_safetensors (FP8 blocks dequantized)
    -> ModelDecodeStep -> dsr.compile(..., backend="interpret"), start_pos a 0-d int64 tensor
    -> feed the prompt token by token, then generate --new tokens greedily, carrying the KV caches

and runs the same greedy loop in eager PyTorch (`model.decode`). Token ids in, token ids out.

The compile is in f32 with FP8 off (`fp8=False`): every GEMM runs on the loaded (dequantized)
weights in f32, as eager does, so the compiled logits agree with eager's to the f32 tolerance and
the greedy choices are the same. (With FP8 on, the logits carry quantization error, and an argmax
near a tie could legitimately differ from unquantized eager; see examples/fp8_policy.py for FP8
checked against eager running the same recipe.)

Prints the prompt and the generated token ids of both loops, and the largest logit error over all
steps. Checks (exit 1 otherwise): the compiled token ids equal eager's, and the logits of every
step are within dsr_compiler.tolerance.compare's f32 tolerance of eager's.
With --config/--checkpoint, checkpoint tensors the model lacks (e.g. MTP layers) are ignored;
missing or mis-shaped tensors are an error.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

import dsr_compiler as dsr
from dsr_compiler.errors import CheckFailed, DsrError
from dsr_compiler.models import DeepSeekModel, ModelConfig, load_state_dict_safetensors, save_safetensors
from dsr_compiler.models.steps import ModelDecodeStep
from dsr_compiler.models.weights import ours_to_hf, quantize_fp8_blocks
from dsr_compiler.tolerance import compare
from dsr_compiler.workloads import host_limit, init_weights
from dsr_compiler.workloads.mla import model_elements

LINEARS = ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "w1", "w2", "w3")   # stored as FP8 blocks


def hf_config(cfg: ModelConfig) -> dict:
    """`cfg` as a Hugging Face DeepSeek-V3 config.json (the field names are HF's already)."""
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg)
         if f.name not in ("name", "source", "rope_scaling", "quantization")}
    d.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], hidden_act="silu",
             tie_word_embeddings=False, torch_dtype="bfloat16")
    if cfg.rope_scaling is not None:
        d["rope_scaling"] = asdict(cfg.rope_scaling)
    if cfg.quantization is not None:
        q = cfg.quantization
        d["quantization_config"] = {"quant_method": q.method, "fmt": q.fmt, "activation_scheme": q.activation_scheme,
                                    "weight_block_size": list(q.weight_block_size)}
    return d


def write_tiny_checkpoint(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """config.json + model.safetensors of a seeded deepseek-v3-tiny, in the published format."""
    cfg = ModelConfig.named("deepseek-v3-tiny")
    config = folder / "config.json"
    config.write_text(json.dumps(hf_config(cfg), indent=2))
    if ModelConfig.from_json(config).architecture() != cfg.architecture():
        raise CheckFailed(f"{config} does not read back as {cfg.name}")
    model = DeepSeekModel(cfg)
    init_weights(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    for name, t in model.state_dict().items():
        if name.endswith("e_score_correction_bias"):        # trained routers carry a non-zero bias
            t = 0.05 * torch.randn(t.shape, generator=g)
        hf = ours_to_hf(name)
        if name.split(".")[-2] in LINEARS and t.dim() == 2:
            q, s = quantize_fp8_blocks(t)
            tensors[hf], tensors[hf + "_scale_inv"] = q, s
        else:
            tensors[hf] = t.to(torch.bfloat16) if t.dim() >= 1 and "bias" not in name else t
    ckpt = folder / "model.safetensors"
    save_safetensors(tensors, ckpt, metadata={"format": "pt"})
    return config, ckpt


def greedy(step, prompt: list[int], new: int, caches: tuple) -> tuple[list[int], list[torch.Tensor]]:
    """Feed `prompt` one token at a time, then pick `new` tokens by argmax; `step(tokens, kv, pe, pos)`."""
    kv, pe = caches
    out: list[int] = []
    logits_seen = []
    tok = prompt[0]
    for pos in range(len(prompt) + new - 1):
        logits, kv, pe = step(torch.tensor([[tok]], dtype=torch.int64), kv, pe, pos)
        logits_seen.append(logits[0, -1])
        if pos + 1 < len(prompt):
            tok = prompt[pos + 1]
        else:
            tok = int(logits[0, -1].argmax())
            out.append(tok)
    return out, logits_seen


def main(config: str | None = None, checkpoint: str | None = None, prompt: tuple[int, ...] = (1, 17, 42),
         new: int = 3, max_seq: int = 16) -> dict:
    with tempfile.TemporaryDirectory(prefix="dsr-generate-") as tmp:
        if config is None and checkpoint is None:
            folder = Path(tmp) / "deepseek-v3-tiny"         # the model's name, as from_json reads it
            folder.mkdir()
            config, checkpoint = write_tiny_checkpoint(folder)
            print(f"wrote a tiny published-format checkpoint: {config}, {checkpoint}")
        elif config is None or checkpoint is None:
            raise DsrError("--config and --checkpoint go together", hint="pass both, or neither for the tiny demo")
        return _generate(config, checkpoint, list(prompt), new, max_seq)


def _generate(config, checkpoint, prompt: list[int], new: int, max_seq: int) -> dict:
    cfg = ModelConfig.from_json(config)
    if not prompt or new < 1 or len(prompt) + new - 1 > max_seq:
        raise DsrError(f"prompt of {len(prompt)} tokens + {new} new tokens does not fit a cache of {max_seq}",
                       hint="pass a non-empty --prompt, --new >= 1 and --max-seq >= prompt + new - 1")
    bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
    if bad:
        raise DsrError(f"prompt token ids {bad} are outside the vocabulary [0, {cfg.vocab_size})")
    need = 2 * 4 * model_elements(cfg)            # the f32 model + the checkpoint's tensors while loading
    if need > host_limit():
        raise DsrError(f"{cfg.name}: the f32 model and its checkpoint need about {need:,} bytes of host memory, "
                       f"more than the {host_limit():,} available", where=str(config),
                       hint="this example runs the model eagerly beside the compiled step: use a small config "
                            "(`dsrc compile --config` compiles full-width models without weights)")
    model = DeepSeekModel(cfg)
    load_state_dict_safetensors(model, checkpoint, strict=False)
    model = model.float().eval()

    step = ModelDecodeStep(model).eval()
    kv, pe = step.init_cache(1, max_seq)
    example = (torch.zeros(1, 1, dtype=torch.int64), kv, pe, torch.tensor(0, dtype=torch.int64))
    t0 = time.perf_counter()
    cm = dsr.compile(step, example, fp8=False, backend="interpret", name="decode_step")
    compile_s = time.perf_counter() - t0
    print(f"compiled {cfg.name} decode step (f32, fp8 off): {len(cm.kernels)} kernels in {compile_s:.1f} s")

    t0 = time.perf_counter()
    tokens, logits = greedy(cm, prompt, new, (kv, pe))
    run_s = time.perf_counter() - t0
    with torch.no_grad():
        def eager_step(tok, kv_pairs, _unused, pos):
            lg, pairs = model.decode(tok, kv_pairs, pos)
            return lg, pairs, None
        ref_tokens, ref_logits = greedy(eager_step, prompt, new, (model.init_cache(1, max_seq), None))
    print(f"prompt {prompt}")
    print(f"compiled greedy: {tokens}  ({len(logits)} decode steps in {run_s:.1f} s on the interpreter)")
    print(f"eager greedy:    {ref_tokens}")
    checks = [compare(a, e) for a, e in zip(logits, ref_logits)]
    worst = max(r["max_abs"] for r in checks)
    print(f"logits vs eager over {len(checks)} steps: max abs err {worst:.2e} "
          f"(f32 tolerance atol {max(r['atol'] for r in checks):.1e})")
    if tokens != ref_tokens:
        raise CheckFailed(f"compiled greedy tokens {tokens} differ from eager's {ref_tokens}")
    if not all(r["ok"] for r in checks):
        raise CheckFailed(f"compiled logits differ from eager beyond tolerance (max abs err {worst:.2e})")
    print("check passed: same tokens as eager, logits within tolerance")
    return {"prompt": prompt, "tokens": tokens, "eager_tokens": ref_tokens, "max_abs": worst,
            "kernels": len(cm.kernels), "steps": len(checks)}


def _ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of token ids") from None


def cli(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="a DeepSeek config.json (HF or reference ModelArgs format)")
    p.add_argument("--checkpoint", help="a .safetensors file or a folder of shards, HF tensor names")
    p.add_argument("--prompt", type=_ids, default=(1, 17, 42), help="token ids, e.g. 1,17,42")
    p.add_argument("--new", type=int, default=3, help="tokens to generate (default 3)")
    p.add_argument("--max-seq", type=int, default=16, help="KV cache length (default 16)")
    a = p.parse_args(argv)
    return main(a.config, a.checkpoint, a.prompt, a.new, a.max_seq)


if __name__ == "__main__":
    try:
        cli()
    except DsrError as e:
        sys.stderr.write(f"generate.py: {e}\n")
        sys.exit(e.exit_code)
