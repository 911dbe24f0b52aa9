"""Group `transformer_engine` (Transformer Engine only; without TE every check is skipped, saying so).

* te_spec_vs_local: the tiny Llama backbone built with megatron's TE layer spec and with the local
  spec, the local model's weights copied into the TE one (fused-norm names mapped as the converter
  maps them, convert/llama.py), one bf16 forward/backward on the same tokens: loss within 1e-2
  relative, every gradient within 5e-2 of its max magnitude.
* fp8_recipes: 20 training steps of the tiny Llama in FP8 (hybrid E4M3/E5M2) with delayed and with
  current (tensorwise) scaling vs 20 bf16 steps of the same seed: every loss finite, the last loss
  within 5 % of bf16's.
* fused_mrope: TE's fused RoPE kernel vs megatron's unfused rotation on M-RoPE frequencies (the omni
  model's `MRoPEEmbedding`; megatron's `apply_rotary_pos_emb` with apply_rope_fusion on / off, batch 1),
  output and input gradient, fp32 and bf16.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Dict, List, Optional

from megatron_omni.gpu_check.context import CheckContext, config_path
from megatron_omni.gpu_check.result import CheckResult, all_finite, judged, skipped

CHECKS = ("te_spec_vs_local", "fp8_recipes", "fused_mrope")
BUDGET_S = {"quick": 80, "full": 100}

TEXT_CONFIG = config_path("tiny", "llm.yaml")
FP8_STEPS, FP8_TOL = 20, 0.05
FP8_RECIPES = ("delayed", "tensorwise")  # mxfp8 / blockwise need Blackwell
SPEC_LOSS_TOL, SPEC_GRAD_TOL = 1e-2, 5e-2
# local-spec parameter names of the norms TE fuses into the next linear (as convert/llama.py maps them)
TE_TO_LOCAL = (("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
               ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"))


def te_missing() -> Optional[str]:
    """Why TE cannot run here, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (Transformer Engine runs on CUDA only)"
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as e:  # noqa: BLE001 - ImportError or a broken install
        return f"Transformer Engine is not importable ({type(e).__name__}: {e}); the NGC PyTorch container has it"
    return None


def fp8_overrides(recipe: Optional[str]) -> List[str]:
    base = ["train.precision=bf16", f"train.steps={FP8_STEPS}", "data.split=100,0,0"]
    return base if recipe is None else [*base, "model.fp8=hybrid", f"model.fp8_recipe={recipe}"]


def plan(ctx: CheckContext) -> Dict[str, Dict]:
    from megatron_omni.config import load_config
    importlib.import_module("megatron_omni.models.rope")  # the check's imports resolve

    for r in (None, *FP8_RECIPES):
        load_config(TEXT_CONFIG, fp8_overrides(r))
    why = te_missing()
    return {
        "te_spec_vs_local": {"config": TEXT_CONFIG, "loss_tol": SPEC_LOSS_TOL, "grad_tol": SPEC_GRAD_TOL,
                             "skip_reason": why},
        "fp8_recipes": {"config": TEXT_CONFIG, "recipes": list(FP8_RECIPES), "steps": FP8_STEPS,
                        "overrides": {r or "bf16": fp8_overrides(r) for r in (None, *FP8_RECIPES)},
                        "tolerance_rel_last_loss": FP8_TOL, "skip_reason": why},
        "fused_mrope": {"skip_reason": why},
    }


def local_name(te_name: str) -> str:
    for te, local in TE_TO_LOCAL:
        if te_name.endswith(te):
            return te_name[: -len(te)] + local
    return te_name


def _spec_vs_local(ctx: CheckContext) -> CheckResult:
    import torch
    from megatron.core.models.gpt import GPTModel

    from megatron_omni.config import load_config
    from megatron_omni.models.init import init_weights_layout_invariant
    from megatron_omni.models.llama import gpt_model_kwargs
    from megatron_omni.parallel.initialize import initialize_distributed, set_random_seeds

    cfg = load_config(TEXT_CONFIG, ["train.precision=bf16"])
    initialize_distributed(cfg.parallel)
    set_random_seeds(cfg.train.seed)
    seq = cfg.data.seq_length

    def build(impl: str):
        model = dataclasses.replace(cfg.model, transformer_impl=impl)
        kw = gpt_model_kwargs(model, cfg.parallel, seq_length=seq, params_dtype=torch.bfloat16)[0]
        kw["config"].gradient_accumulation_fusion = False  # no DDP here: gradients go to .grad, not main_grad
        return GPTModel(**kw).cuda()

    local = build("local")
    init_weights_layout_invariant([local], cfg.model, cfg.train.seed)
    te = build("transformer_engine")
    local_params = dict(local.named_parameters())
    with torch.no_grad():
        for name, p in te.named_parameters():
            p.copy_(local_params[local_name(name)])
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, seq + 1), generator=gen).cuda()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(seq, device="cuda").unsqueeze(0).expand(2, -1)

    def loss_and_grads(model):
        # no mask: both specs apply their causal mask type (local: megatron's default causal mask)
        loss = model(inputs, position_ids, None, labels=labels).float().mean()
        loss.backward()
        return loss.item(), {n: p.grad.float() for n, p in model.named_parameters()}

    l_loss, l_grads = loss_and_grads(local)
    t_loss, t_grads = loss_and_grads(te)
    grad_err = {n: float((g - l_grads[local_name(n)]).abs().max() / l_grads[local_name(n)].abs().max().clamp(min=1e-12))
                for n, g in t_grads.items()}
    worst = max(grad_err, key=grad_err.get)
    loss_err = abs(t_loss - l_loss) / abs(l_loss)
    return judged("te_spec_vs_local", loss_err <= SPEC_LOSS_TOL and grad_err[worst] <= SPEC_GRAD_TOL,
                  f"TE spec vs local spec, same weights, bf16 fwd/bwd: loss rel {loss_err:.2e} (tol {SPEC_LOSS_TOL:g}), "
                  f"worst gradient {worst} {grad_err[worst]:.2e} of its max (tol {SPEC_GRAD_TOL:g})",
                  loss_te=t_loss, loss_local=l_loss, grad_rel_err=grad_err)


def _fp8(ctx: CheckContext) -> CheckResult:
    from megatron_omni.gpu_check.runs import train_run

    runs = {}
    for recipe in (None, *FP8_RECIPES):
        key = recipe or "bf16"
        try:
            runs[key] = train_run(TEXT_CONFIG, fp8_overrides(recipe), out=ctx.path("te", f"fp8_{key}", ""),
                                  steps=FP8_STEPS, warmup=2)
        except Exception as e:  # noqa: BLE001 - each recipe reports on its own
            from megatron_omni.gpu_check.worker import error_text

            runs[key] = error_text(e)
    if isinstance(runs["bf16"], str):
        raise RuntimeError(f"the bf16 reference run failed: {runs['bf16']}")
    ref = runs["bf16"].losses
    numbers, ok, parts = {"bf16_losses": ref}, True, []
    for recipe in FP8_RECIPES:
        r = runs[recipe]
        if isinstance(r, str):
            numbers[recipe] = {"error": r}
            ok = False
            parts.append(f"{recipe} failed")
            continue
        finite = all_finite(r.losses)
        last = abs(r.losses[-1] - ref[-1]) / abs(ref[-1])
        good = finite and last <= FP8_TOL
        ok = ok and good
        numbers[recipe] = {"losses": r.losses, "last_loss_rel_diff": last, "finite": finite,
                           "step_ms": r.summary["step_time_ms"]["mean"]}
        parts.append(f"{recipe} last loss {last:.2%} off")
    return judged("fp8_recipes", ok, f"FP8 hybrid vs bf16 after {FP8_STEPS} steps (tol {FP8_TOL:.0%}): "
                  + ", ".join(parts), **numbers)


def _fused_mrope(ctx: CheckContext) -> CheckResult:
    from types import SimpleNamespace

    import torch
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_omni.models.rope import MRoPEEmbedding

    seq, heads, dim, section = 512, 8, 128, [16, 24, 24]
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 64, (3, 1, seq), generator=gen).cuda()
    freqs = MRoPEEmbedding(kv_channels=dim, rotary_base=1000000, device=pos.device)(pos, section)
    if rope_utils.fused_apply_rotary_pos_emb is None:
        return skipped("fused_mrope", "megatron found no fused RoPE kernel (fused_apply_rotary_pos_emb is None)")
    one_rank = SimpleNamespace(size=lambda: 1, rank=lambda: 0)  # no context parallelism

    def rotate(t, fused: bool):  # the fields of the attention's TransformerConfig that the rotation reads
        config = SimpleNamespace(apply_rope_fusion=fused, mrope_section=section, rotary_interleaved=False,
                                 multi_latent_attention=False)
        return rope_utils.apply_rotary_pos_emb(t, freqs, config, cp_group=one_rank)

    numbers, ok = {}, True
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        base = torch.randn(seq, 1, heads, dim, generator=gen).cuda().to(dtype)
        outs, grads = [], []
        for fused in (True, False):
            t = base.clone().requires_grad_()
            out = rotate(t, fused)
            out.float().pow(2).sum().backward()
            outs.append(out.detach().float())
            grads.append(t.grad.float())
        err_out = float((outs[0] - outs[1]).abs().max() / outs[1].abs().max())
        err_grad = float((grads[0] - grads[1]).abs().max() / grads[1].abs().max())
        numbers[str(dtype).split(".")[-1]] = {"out_rel": err_out, "grad_rel": err_grad, "tol": tol}
        ok = ok and max(err_out, err_grad) <= tol
    return judged("fused_mrope", ok, "TE fused RoPE vs unfused on M-RoPE freqs [16, 24, 24], fp32 (1e-5) "
                  "and bf16 (2e-2): " + ", ".join(f"{k} out {v['out_rel']:.1e} grad {v['grad_rel']:.1e}"
                                                   for k, v in numbers.items()), **numbers)


def run(ctx: CheckContext, emit: Callable[[CheckResult], None]) -> None:
    from megatron_omni.gpu_check.worker import guarded

    why = te_missing()
    if why:
        for name in CHECKS:
            emit(skipped(name, why))
        return
    emit(guarded("te_spec_vs_local", lambda: _spec_vs_local(ctx)))
    emit(guarded("fused_mrope", lambda: _fused_mrope(ctx)))
    emit(guarded("fp8_recipes", lambda: _fp8(ctx)))
