"""Multimodal RoPE (M-RoPE): 3D (temporal, height, width) position ids and the rotation's config.

Position ids
------------
:func:`mrope_position_ids` -- text / image / video, equal bit-for-bit to ``transformers``'
``Qwen2VLModel.get_rope_index`` (installed 5.x behaviour; optional Qwen2.5-VL time scaling via
``second_per_grid_ts`` + ``tokens_per_second``; ``legacy=True`` gives the original 4.x Qwen2-VL
rule "text after a vision span continues from the span's max position + 1", padding 1).  Returns
``(position_ids [3, B, S] (dtype of input_ids), deltas [B, 1] int64)``; deltas are
``max_position + 1 - number_of_valid_tokens`` (used to continue positions during decoding).
The data side computes them once per sample (data/sample_builder.py: audio placeholders are
ordinary linear positions, like text); every pipeline stage receives them.

Rotation
--------
megatron-core 0.16.1 already implements M-RoPE: ``MultimodalRotaryEmbedding`` (position ids
``[3, B, S]`` + ``mrope_section`` -> freqs ``[S, B, 1, dim]`` with the T/H/W channel sections
interleaved exactly like HF) and ``rope_utils.apply_rotary_pos_emb``, which megatron's attention
calls (bshd, or THD with per-token freqs: ``freqs.size(0) == cu_seqlens[-1]``).  The omni model
(models/omni.py) uses both:

* :class:`MRoPEEmbedding` -- megatron's ``MultimodalRotaryEmbedding`` whose ``inv_freq`` is built on
  a chosen device (upstream hard-codes ``torch.cuda.current_device()``, so it cannot be built on a
  CPU-only machine); its ``forward`` is upstream's.
* ``models/llama.py::transformer_config(mrope_section=...)`` sets ``TransformerConfig.mrope_section``
  and turns ``apply_rope_fusion`` off at construction: M-RoPE freqs are *per token* (not per
  position-in-sequence), and TE's fused bshd kernel would broadcast row 0's freqs over the batch, its
  THD kernel index them by position inside each sequence.  megatron's unfused rotation runs; it is the
  path tested against HF.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding, RotaryEmbedding

__all__ = ["mrope_position_ids", "MRoPEEmbedding"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _grid_positions(t_index: Tensor, h: int, w: int, start) -> Tensor:
    """[3, len(t_index)*h*w] positions (t, h, w) + start for a (t, h, w) token grid (t-major)."""
    nt = t_index.numel()
    t = t_index.view(-1, 1).expand(nt, h * w).reshape(-1)
    hh = torch.arange(h).view(1, -1, 1).expand(nt, h, w).reshape(-1)
    ww = torch.arange(w).view(1, 1, -1).expand(nt, h, w).reshape(-1)
    return torch.stack([t, hh, ww]) + start


def _linear(n: int, start) -> Tensor:
    return torch.arange(n).view(1, -1).expand(3, -1) + start


def _runs(types: Tensor) -> List[Tuple[int, int, int]]:
    """Maximal runs of equal values: [(value, start, end)] (vectorised)."""
    n = types.numel()
    if n == 0:
        return []
    change = torch.nonzero(types[1:] != types[:-1]).flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), change]).tolist()
    ends = starts[1:] + [n]
    vals = types[starts].tolist()
    return list(zip(vals, starts, ends))


# --------------------------------------------------------------------------------------------
# Qwen2-VL style position ids
# --------------------------------------------------------------------------------------------


def mrope_position_ids(
    input_ids: Tensor,
    image_grid_thw: Optional[Tensor] = None,
    video_grid_thw: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    *,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: Optional[int] = None,
    spatial_merge_size: int,
    second_per_grid_ts: Optional[Sequence] = None,
    tokens_per_second: Optional[float] = None,
    legacy: bool = False,
) -> Tuple[Tensor, Tensor]:
    """3D position ids like HF ``Qwen2VLModel.get_rope_index``.

    Image / video spans are the runs of ``image_token_id`` / ``video_token_id`` tokens (what HF's
    ``mm_token_type_ids`` encodes); grids are consumed in order across the whole batch.  A run
    longer than its grid is split over consecutive grids (HF would merge them; identical whenever
    spans are separated, e.g. by vision start/end tokens).  ``vision_start_token_id`` is accepted
    for API compatibility with the pre-5.x HF signature and is not needed to locate spans.

    Vision span starting at text position ``p``: ``t = p + floor(arange(T) * interval)``,
    ``h = p + arange(H/m)``, ``w = p + arange(W/m)`` with ``interval = 1`` (Qwen2-VL) or
    ``tokens_per_second * second_per_grid_ts[v]`` for videos (Qwen2.5-VL).  Text after the span
    continues from ``p + max(H/m, W/m)`` (HF 5.x) or, with ``legacy=True``, from the span's
    max position + 1 (original Qwen2-VL / HF 4.x; padding then filled with 1 instead of 0).
    """
    B, S = input_ids.shape
    device = input_ids.device
    ids_cpu = input_ids.detach().cpu()
    mask_cpu = attention_mask.detach().cpu().bool() if attention_mask is not None else None
    position_ids = torch.full((3, B, S), 1 if legacy else 0, dtype=input_ids.dtype)
    grids = {1: image_grid_thw.cpu().tolist() if image_grid_thw is not None else [],
             2: video_grid_thw.cpu().tolist() if video_grid_thw is not None else []}
    gidx = {1: 0, 2: 0}
    spg_list = None
    if second_per_grid_ts is not None:
        spg_list = [s for s in (second_per_grid_ts.cpu() if isinstance(second_per_grid_ts, Tensor)
                                else second_per_grid_ts)]
    deltas = []
    m = spatial_merge_size
    for b in range(B):
        ids = ids_cpu[b] if mask_cpu is None else ids_cpu[b][mask_cpu[b]]
        types = (ids == image_token_id).long() + 2 * (ids == video_token_id).long()
        parts: List[Tensor] = []
        cur = 0
        for kind, s, e in _runs(types):
            if kind == 0:
                parts.append(_linear(e - s, cur))
                cur += e - s
                continue
            pos = s
            while pos < e:
                t, h, w = grids[kind][gidx[kind]]
                h, w = h // m, w // m
                if kind == 2 and tokens_per_second is not None:
                    spg = spg_list[gidx[2]] if spg_list is not None else 1
                    t_index = (torch.arange(t) * (tokens_per_second * spg)).long()
                else:
                    t_index = torch.arange(t)
                gidx[kind] += 1
                vis = _grid_positions(t_index, h, w, cur)
                parts.append(vis)
                cur = int(vis.max()) + 1 if legacy else cur + max(h, w)
                pos += t * h * w
            if pos != e:
                raise ValueError(f"{'image' if kind == 1 else 'video'} span of {e - s} tokens does "
                                 "not match its grid_thw")
        llm_positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
        if mask_cpu is None:
            position_ids[:, b] = llm_positions
        else:
            position_ids[:, b, mask_cpu[b]] = llm_positions
        deltas.append(int(llm_positions.max()) + 1 - ids.numel())
    return position_ids.to(device), torch.tensor(deltas, device=device).unsqueeze(1)


# --------------------------------------------------------------------------------------------
# rotation (megatron-core)
# --------------------------------------------------------------------------------------------


class MRoPEEmbedding(MultimodalRotaryEmbedding):
    """megatron-core ``MultimodalRotaryEmbedding`` that can be built off-GPU, with Llama-3.1 scaling.

    Same ``inv_freq`` formula and the upstream ``forward(position_ids [3, B, S], mrope_section)``
    -> freqs ``[S, B, 1, rot_dim]``; ``inv_freq`` is a non-persistent buffer so ``.to()`` moves it.
    The omni model's ``rotary_pos_emb`` (``GPTModel.forward``'s ``position_embedding_type='mrope'`` branch).
    """

    def __init__(
        self,
        kv_channels: int,
        rotary_percent: float = 1.0,
        rotary_interleaved: bool = False,
        seq_len_interpolation_factor: Optional[float] = None,
        rotary_base: int = 10000,
        cp_group=None,
        device=None,
        rope_scaling: bool = False,
        rope_scaling_factor: float = 8.0,
    ) -> None:
        nn.Module.__init__(self)
        dim = kv_channels
        if rotary_percent < 1.0:
            dim = int(dim * rotary_percent)
        self.rotary_interleaved = rotary_interleaved
        self.seq_len_interpolation_factor = seq_len_interpolation_factor
        if device is None:
            device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        inv_freq = 1.0 / (
            rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
        )
        if rope_scaling:  # Llama-3.1 "llama3" scaling, megatron's own (RotaryEmbedding._apply_scaling)
            inv_freq = RotaryEmbedding._apply_scaling(self, inv_freq, factor=rope_scaling_factor)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # Unlike upstream, no default CP group: the freqs are sliced for context parallelism (BSHD
        # chunks) only when a group is given, here or to forward.
        self.cp_group = cp_group

    def _apply(self, fn, recurse=True):
        """Device moves apply to ``inv_freq``, dtype casts do not: megatron's ``Float16Module``
        casts the whole model to bf16/fp16, but upstream's forward multiplies ``inv_freq`` with
        fp32 positions (and bf16 frequencies would lose the rotation's precision)."""
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self


