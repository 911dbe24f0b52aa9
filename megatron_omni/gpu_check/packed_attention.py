"""Group `packed_attention`: the THD (varlen) packed-attention backends vs a dense reference.

The backends come from `megatron_omni.models.packed_attention` (issue 14). Expected interface:
`packed_attention(q, k, v, cu_seqlens, *, backend=...)` on q [T, H, D], k/v [T, G, D] (GQA), causal
inside every cu_seqlens segment, and the backend names in `BACKENDS` or `available_backends()`.
Without that module (or interface) the check is skipped with the reason.

Reference, computed here in fp32: softmax(QK^T / sqrt(D)) V under data/packing.py's block-diagonal
causal mask.  Each backend runs in bf16; its output and q/k/v gradients must be within
`BF16_TOL` of the reference's max magnitude.  Then one attention layer's forward + backward peak
memory at seq 8192 (four packed samples) for every backend and for the dense reference.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable, Dict, List, Optional, Tuple

from megatron_omni.gpu_check.context import CheckContext
from megatron_omni.gpu_check.result import CheckResult, judged, skipped

CHECKS = ("packed_attention_backends",)
BUDGET_S = {"quick": 45, "full": 60}
MODULE = "megatron_omni.models.packed_attention"
BF16_TOL = 2e-2
GIB = 1024 ** 3


def shapes(ctx: CheckContext) -> Dict[str, object]:
    """(heads, kv groups, head dim) of Llama-3-8B, sample lengths of the accuracy and memory rows."""
    if ctx.cpu:
        return {"heads": 4, "groups": 2, "head_dim": 16, "accuracy": [5, 9, 2], "memory": [64, 96, 32, 64]}
    return {"heads": 32, "groups": 8, "head_dim": 128, "accuracy": [300, 700, 24], "memory": [2048, 3072, 1024, 2048]}


def find_backends() -> Tuple[Optional[Callable], List[str], str]:
    """(function, backend names, why not) from the THD module, whatever of it exists."""
    try:
        mod = importlib.import_module(MODULE)
    except ImportError as e:
        return None, [], f"{MODULE} is not importable ({e}); the THD attention of issue 14 is not in this tree"
    fn = getattr(mod, "packed_attention", None)
    names = getattr(mod, "BACKENDS", None)
    if callable(getattr(mod, "available_backends", None)):
        names = mod.available_backends()
    if fn is None or not names:
        public = sorted(n for n in dir(mod) if not n.startswith("_"))
        return None, [], (f"{MODULE} has no packed_attention(q, k, v, cu_seqlens, backend=) + BACKENDS / "
                          f"available_backends(); it has {public}: adapt gpu_check/packed_attention.py")
    return fn, list(names), ""


def plan(ctx: CheckContext) -> Dict[str, Dict]:
    fn, names, why = find_backends()
    return {"packed_attention_backends": {"module": MODULE, "backends": names, "skip_reason": why or None,
                                          **shapes(ctx), "tolerance": BF16_TOL}}


def _inputs(lengths, heads, groups, head_dim, device, dtype, seed=0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q = torch.randn(t, heads, head_dim, generator=gen)
    k = torch.randn(t, groups, head_dim, generator=gen)
    v = torch.randn(t, groups, head_dim, generator=gen)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return [x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v)], cu.to(device)


def dense_reference(q, k, v, cu):
    """fp32 (whatever the inputs) masked softmax attention over the packed row, [T, H, D]."""
    import torch

    from megatron_omni.data.packing import packed_attention_mask

    t, h, d = q.shape
    rep = h // k.shape[1]
    qf, kf, vf = (x.float() for x in (q, k, v))
    kf, vf = kf.repeat_interleave(rep, dim=1), vf.repeat_interleave(rep, dim=1)
    scores = torch.einsum("thd,shd->hts", qf, kf) / d ** 0.5
    mask = packed_attention_mask(cu.long(), 1, t)[0]  # [1, T, T], True = masked
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("hts,shd->thd", probs, vf)


def _call(fn, backend, q, k, v, cu):
    params = inspect.signature(fn).parameters
    kwargs = {"backend": backend} if "backend" in params else {}
    if "max_seqlen" in params:
        kwargs["max_seqlen"] = int((cu[1:] - cu[:-1]).max())
    return fn(q, k, v, cu, **kwargs)


def _fwd_bwd(attn, q, k, v, cu, grad_out):
    out = attn(q, k, v, cu)
    out.backward(grad_out.to(out.dtype))
    return out.detach().float(), [x.grad.detach().float() for x in (q, k, v)]


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _peak_gib(attn, lengths, s, device, dtype) -> Optional[float]:
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    (q, k, v), cu = _inputs(lengths, s["heads"], s["groups"], s["head_dim"], device, dtype)
    out = attn(q, k, v, cu)
    out.float().sum().backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GIB


def _check(ctx: CheckContext) -> CheckResult:
    import torch

    fn, names, why = find_backends()
    if fn is None:
        return skipped("packed_attention_backends", why)
    s = shapes(ctx)
    device = torch.device("cpu" if ctx.cpu else "cuda")
    (q32, k32, v32), cu = _inputs(s["accuracy"], s["heads"], s["groups"], s["head_dim"], device, torch.float32)
    grad_out = torch.randn(q32.shape, generator=torch.Generator().manual_seed(1)).to(device)
    ref_out, ref_grads = _fwd_bwd(dense_reference, q32, k32, v32, cu, grad_out)
    per_backend: Dict[str, Dict] = {}
    ok = True
    for name in names:
        try:
            (q, k, v), cu_b = _inputs(s["accuracy"], s["heads"], s["groups"], s["head_dim"], device, torch.bfloat16)
            out, grads = _fwd_bwd(lambda *a, n=name: _call(fn, n, *a), q, k, v, cu_b, grad_out)
            errs = {"out": _rel(out, ref_out), **{f"d{x}": _rel(g, r) for x, g, r in zip("qkv", grads, ref_grads)}}
            mem = _peak_gib(lambda *a, n=name: _call(fn, n, *a), s["memory"], s, device, torch.bfloat16)
            good = max(errs.values()) <= BF16_TOL
            per_backend[name] = {"rel_err": errs, "ok": good, "peak_memory_gib_seq": mem}
        except Exception as e:  # noqa: BLE001 - one backend failing must not hide the others
            from megatron_omni.gpu_check.worker import error_text

            good = False
            per_backend[name] = {"ok": False, "error": error_text(e)}
        ok = ok and good
    dense_mem = _peak_gib(dense_reference, s["memory"], s, device, torch.bfloat16)
    summary = ", ".join(f"{n} {'ok' if r['ok'] else 'FAILED'}" for n, r in per_backend.items())
    return judged("packed_attention_backends", ok,
                  f"bf16 backends vs fp32 dense masked attention (output and q/k/v gradients within "
                  f"{BF16_TOL:g} of max|ref|): {summary}; one layer's memory at seq {sum(s['memory'])} "
                  f"in numbers", backends=per_backend, dense_reference_peak_memory_gib=dense_mem,
                  memory_seq=sum(s["memory"]))


def run(ctx: CheckContext, emit: Callable[[CheckResult], None]) -> None:
    from megatron_omni.gpu_check.worker import guarded

    emit(guarded("packed_attention_backends", lambda: _check(ctx)))
