"""Packed (THD / varlen) attention without Transformer Engine, and the `model.packed_attention` choice.

Packed omni rows hold several samples; attention is causal inside each `cu_seqlens` segment and
nothing crosses a boundary.  Instead of a dense block-diagonal [S, S] mask (`dense`, the
reference), the THD path hands the segments to a varlen kernel: no S x S tensor is built or stored.

* `PackedCoreAttention` -- megatron's `core_attention` slot (constructor and forward of
  `DotProductAttention`), taking `PackedSeqParams(qkv_format="thd")`: q [T, np, hn], k/v [T, ng, hn]
  (this TP rank's heads; sequence parallel is undone by the QKV projection before it, as in
  megatron's local spec).  On CUDA in fp16/bf16 `torch.nn.attention.varlen.varlen_attn` (FlashAttention
  inside torch: GQA, causal, cu_seqlens on the device); elsewhere (CPU, fp32) exact per-segment
  `scaled_dot_product_attention`, its segment lengths read from the host copy of the boundaries.
  Under context parallelism `cp_all_gather_kv_attention`: exact, K/V of the whole padded stream
  all-gathered over the CP group (per-chunk SDPA; TE's CP attention is the `te` path's).
* `packed_attention(q, k, v, cu_seqlens, *, backend=)` -- the same math as a function (the GPU
  check and the tests call it); `BACKENDS` / `available_backends()` name what can run here.
* `resolve_packed_attention(choice)` -- `auto | te | torch | dense` -> what runs, in one log line.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor

from megatron_omni.config.schema import PACKED_ATTENTION_CHOICES
from megatron_omni.parallel.context_parallel import ThdCpSplit

log = logging.getLogger(__name__)

# Functional backends of `packed_attention`: `torch` = `varlen` on CUDA, `sdpa` elsewhere.
BACKENDS = ("torch", "sdpa", "varlen", "dense")
_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        return None
    return varlen_attn


def varlen_usable(device: torch.device) -> bool:
    """torch's varlen FlashAttention runs here (CUDA tensors and a torch that has it)."""
    return device.type == "cuda" and _varlen_attn() is not None


def available_backends(device: Optional[torch.device] = None) -> List[str]:
    """The functional backends that run on `device` (default: CUDA when present, else CPU)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [b for b in BACKENDS if b != "varlen" or varlen_usable(device)]


@functools.lru_cache(maxsize=None)
def resolve_packed_attention(choice: str, te_layers: bool) -> str:
    """`model.packed_attention` -> the path that runs (`te`, `torch` or `dense`), logged once.
    `te_layers`: the model is built from Transformer Engine layers (`Kernels.transformer_engine`)."""
    if choice not in PACKED_ATTENTION_CHOICES:
        raise ValueError(f"model.packed_attention={choice!r} is not one of {list(PACKED_ATTENTION_CHOICES)}")
    if choice == "te" and not te_layers:
        raise RuntimeError(
            "model.packed_attention=te but the model is not built from Transformer Engine layers (needs CUDA, "
            "transformer-engine[pytorch] and model.transformer_impl auto or transformer_engine); use "
            "model.packed_attention=auto or torch")
    backend = ("te" if te_layers else "torch") if choice == "auto" else choice
    on_cuda = torch.cuda.is_available() and _varlen_attn() is not None
    where = {"te": "Transformer Engine fused attention on THD (cu_seqlens)",
             "torch": ("torch varlen_attn (FlashAttention; fp32 or attention dropout: per-segment SDPA)" if on_cuda
                       else "per-segment scaled_dot_product_attention") + " on THD (cu_seqlens)",
             "dense": "dense block-diagonal [S, S] mask (AttnMaskType.arbitrary)"}[backend]
    log.info("packed attention: %s (model.packed_attention=%s)", where, choice)
    return backend


def host_lengths(cu_seqlens: Tensor) -> List[int]:
    """Segment lengths as Python ints (a device sync when `cu_seqlens` is on the device)."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()


def sdpa_per_segment(q: Tensor, k: Tensor, v: Tensor, lengths: Sequence[int], *, causal: bool = True,
                     scale: Optional[float] = None, dropout_p: float = 0.0) -> Tensor:
    """Exact attention inside each segment: one `scaled_dot_product_attention` per segment on
    q [T, H, D], k/v [T, G, D] (GQA: H a multiple of G).  Nothing of size T x T exists."""
    gqa = q.shape[1] != k.shape[1]
    out = []
    for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        o = F.scaled_dot_product_attention(
            qs.transpose(0, 1).unsqueeze(0), ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0),
            dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=gqa)
        out.append(o.squeeze(0).transpose(0, 1))
    return torch.cat(out) if len(out) > 1 else out[0]


def varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, causal: bool = True,
           scale: Optional[float] = None) -> Tensor:
    """torch's varlen FlashAttention (CUDA); k/v keep their G heads (FlashAttention does GQA)."""
    fn = _varlen_attn()
    cu = cu_seqlens.to(torch.int32)
    return fn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale, window_size=(-1, 0) if causal else (-1, -1))


def dense_block_diagonal(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *, causal: bool = True,
                         scale: Optional[float] = None) -> Tensor:
    """The reference: one SDPA over the whole row with the block-diagonal [T, T] mask."""
    t = q.shape[0]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=q.device), lengths, output_size=t)
    allowed = seg.unsqueeze(0) == seg.unsqueeze(1)
    if causal:
        allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                       attn_mask=allowed, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return o.transpose(0, 1)


def packed_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *, backend: str = "torch",
                     max_seqlen: Optional[int] = None, causal: bool = True, scale: Optional[float] = None,
                     dropout_p: float = 0.0, lengths: Optional[Sequence[int]] = None) -> Tensor:
    """Attention of packed q [T, H, D], k/v [T, G, D] inside each `cu_seqlens` segment -> [T, H, D].

    `lengths`: the segment lengths as host ints, so the per-segment path needs no device sync;
    `max_seqlen` likewise for varlen (both are read from `cu_seqlens` when not given)."""
    if backend == "torch":  # varlen_attn runs fp16/bf16 without dropout: else the exact per-segment path
        flash = varlen_usable(q.device) and q.dtype in (torch.float16, torch.bfloat16) and not dropout_p
        backend = "varlen" if flash else "sdpa"
    if dropout_p and backend != "sdpa":
        raise ValueError(f"attention dropout is only supported by the per-segment backend, not {backend!r}")
    if backend == "sdpa":
        lengths = lengths if lengths is not None else host_lengths(cu_seqlens)
        return sdpa_per_segment(q, k, v, lengths, causal=causal, scale=scale, dropout_p=dropout_p)
    if backend == "varlen":
        if not varlen_usable(q.device):
            raise RuntimeError("backend 'varlen' needs CUDA tensors and torch.nn.attention.varlen (torch >= 2.9)")
        if max_seqlen is None:
            max_seqlen = max(lengths if lengths is not None else host_lengths(cu_seqlens))
        return varlen(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale)
    if backend == "dense":
        return dense_block_diagonal(q, k, v, cu_seqlens, causal=causal, scale=scale)
    raise ValueError(f"packed attention backend {backend!r} is not one of {list(BACKENDS)}")


def packed_attention_spec(layer_spec: ModuleSpec, backend: str) -> ModuleSpec:
    """A megatron GPT layer spec whose self-attention takes the packed path `backend`
    (`resolve_packed_attention`): `dense` = arbitrary (block-diagonal) mask, THD = padding_causal
    with TE's core attention (`te`, already in the TE spec) or `PackedCoreAttention` (`torch`).
    A new spec: `layer_spec` (e.g. megatron's, shared by every chunk) is left as it was."""
    layer = layer_spec.submodules
    attention = layer.self_attention
    mask_type = AttnMaskType.arbitrary if backend == "dense" else AttnMaskType.padding_causal
    attention_submodules = attention.submodules
    if backend == "torch":
        attention_submodules = replace(attention_submodules, core_attention=PackedCoreAttention)
    attention = replace(attention, params={**attention.params, "attn_mask_type": mask_type},
                        submodules=attention_submodules)
    return replace(layer_spec, submodules=replace(layer, self_attention=attention))


@dataclass
class PackedSeqParamsWithLengths(PackedSeqParams):
    """megatron's `PackedSeqParams` + the segment lengths as host ints, read once per microbatch
    (the per-segment attention of every layer needs them on the host), and with context
    parallelism the rank's token split (`parallel/context_parallel.py::ThdCpSplit`, on the device)."""

    segment_lengths: Optional[List[int]] = None
    cp_split: Optional[ThdCpSplit] = None


def thd_packed_seq_params(cu_seqlens_host: Tensor, cu_seqlens: Optional[Tensor] = None,
                          backend: str = "torch", cp_split: Optional[ThdCpSplit] = None
                          ) -> PackedSeqParamsWithLengths:
    """megatron's THD parameters of a packed stream (an omni microbatch's B rows back to back).

    `cu_seqlens` is the device copy (what the attention kernels read; default: the host one); the
    segment lengths are read once from the host copy (every layer's per-segment attention uses
    them).  For the `torch` backend `cu_seqlens_*_padded` are the host copy (no padding between
    segments: the same values): megatron's THD rotary reads the boundaries on the host
    (`.tolist()`, `.item()` per segment, per layer) and prefers the padded ones -- host reads, no
    device sync.  TE reads the padded boundaries on the device, so they stay unset there.

    With `cp_split` (context parallelism) the segments are the padded ones of the split: the
    rotary maps the full padded stream's freqs to this rank's chunks by those boundaries; `torch`
    attends the padded segments (pad tokens follow their segment's tokens, so causal attention
    hides them), TE gets the real boundaries and the padded ones on the device."""
    if cp_split is not None:
        padded_host = cp_split.cu_seqlens_padded
        lengths = list(cp_split.padded_lengths)
        if backend == "torch":
            cu, padded = padded_host, padded_host
        else:
            device = cu_seqlens.device if cu_seqlens is not None else padded_host.device
            cu = cu_seqlens if cu_seqlens is not None else cu_seqlens_host
            padded = padded_host.to(device, non_blocking=True)
    else:
        lengths = host_lengths(cu_seqlens_host)
        cu = cu_seqlens if cu_seqlens is not None else cu_seqlens_host
        padded = cu_seqlens_host if backend == "torch" else None
    return PackedSeqParamsWithLengths(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
        max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths), segment_lengths=lengths, cp_split=cp_split)


def cp_all_gather_kv_attention(q: Tensor, k: Tensor, v: Tensor, split: ThdCpSplit, group, *, causal: bool = True,
                               scale: Optional[float] = None, dropout_p: float = 0.0) -> Tensor:
    """Exact context-parallel attention of this rank's tokens (`split`: 2*cp chunk order) by
    all-gathering K and V of the whole padded stream over the CP group: each local query chunk k of
    a segment attends that segment's keys [0, (k+1)*c) causally (c = chunk length), nothing else.
    The gather is megatron's sequence-parallel all-gather along dim 0, whose backward
    reduce-scatters the K/V gradients back to the ranks holding those tokens.  q [T/cp, H, D]."""
    k_all = tensor_parallel.gather_from_sequence_parallel_region(k, True, group=group)
    v_all = tensor_parallel.gather_from_sequence_parallel_region(v, True, group=group)
    k_stream = k_all.index_select(0, split.gathered_to_stream)
    v_stream = v_all.index_select(0, split.gathered_to_stream)
    gqa = q.shape[1] != k.shape[1]
    cp, rank = split.cp_size, split.cp_rank
    out, q_start = [], 0
    for seg_start, n in zip(split.cu_seqlens_padded[:-1].tolist(), split.padded_lengths):
        c = n // (2 * cp)
        for chunk in (rank, 2 * cp - 1 - rank):
            qc = q[q_start:q_start + c]
            q_start += c
            kv_end = seg_start + ((chunk + 1) * c if causal else n)
            kc, vc = k_stream[seg_start:kv_end], v_stream[seg_start:kv_end]
            mask = None
            if causal:  # query a (segment position chunk*c + a) sees keys 0 .. chunk*c + a
                mask = (torch.arange(kc.shape[0], device=q.device).unsqueeze(0)
                        <= torch.arange(chunk * c, (chunk + 1) * c, device=q.device).unsqueeze(1))
            o = F.scaled_dot_product_attention(
                qc.transpose(0, 1).unsqueeze(0), kc.transpose(0, 1).unsqueeze(0), vc.transpose(0, 1).unsqueeze(0),
                attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
            out.append(o.squeeze(0).transpose(0, 1))
    return torch.cat(out)


class PackedCoreAttention(MegatronModule):
    """megatron's `core_attention` for THD inputs, torch-native (no Transformer Engine).

    Same constructor and forward as megatron's `DotProductAttention`; `forward` needs
    `packed_seq_params` with `qkv_format="thd"` and returns [T, np * hn].  `cu_seqlens_q` is what
    varlen reads on the device; the per-segment path takes its lengths from
    `PackedSeqParamsWithLengths.segment_lengths` when given (no device sync), else reads them."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        tp = pg_collection.tp.size()
        # context parallelism: the exact all-gather-KV attention (cp_comm_type is TE's, not used here)
        self.cp_group = pg_collection.cp if config.context_parallel_size > 1 else None
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.hidden_size_per_partition = divide(config.kv_channels * config.num_attention_heads, tp)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        # KV-cached generation (megatron_omni.inference) runs [s, b] batches with an explicit mask
        # (left padding, cached keys): megatron's own masked attention, no parameters of its own.
        self.masked_attention = DotProductAttention(
            config, layer_number, AttnMaskType.arbitrary, attention_type, attention_dropout=attention_dropout,
            softmax_scale=softmax_scale, pg_collection=pg_collection) if config.context_parallel_size == 1 else None

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> Tensor:
        if packed_seq_params is None and attention_mask is not None and self.masked_attention is not None:
            return self.masked_attention(query, key, value, attention_mask, attention_bias=attention_bias)
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            raise ValueError("PackedCoreAttention runs packed THD inputs (PackedSeqParams(qkv_format='thd')), or an "
                             "explicit mask without context parallelism (generation); the dense-mask path is "
                             "model.packed_attention=dense")
        if attention_bias is not None or attention_mask is not None:
            raise ValueError("PackedCoreAttention takes no attention mask or bias: segments come from cu_seqlens")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        lengths = getattr(packed_seq_params, "segment_lengths", None)
        dropout_p = self.dropout_p if self.training else 0.0
        # megatron's DotProductAttention: dropout under the TP RNG tracker unless sequence parallel
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p and not self.config.sequence_parallel
               else contextlib.nullcontext())
        split = getattr(packed_seq_params, "cp_split", None)
        if self.cp_group is not None and split is None:
            raise ValueError("PackedCoreAttention under context parallelism needs the rank's token split "
                             "(PackedSeqParamsWithLengths.cp_split, training/stage_inputs.py builds it)")
        with rng:
            if self.cp_group is not None:
                out = cp_all_gather_kv_attention(query, key, value, split, self.cp_group, causal=mask_type in _CAUSAL,
                                                 scale=self.softmax_scale, dropout_p=dropout_p)
                return out.reshape(out.shape[0], self.hidden_size_per_partition)
            out = packed_attention(query, key, value, packed_seq_params.cu_seqlens_q, backend="torch",
                                   max_seqlen=packed_seq_params.max_seqlen_q, causal=mask_type in _CAUSAL,
                                   scale=self.softmax_scale, dropout_p=dropout_p, lengths=lengths)
        return out.reshape(out.shape[0], self.hidden_size_per_partition)
