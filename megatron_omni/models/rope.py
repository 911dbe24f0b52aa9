"""Multimodal RoPE (M-RoPE): 3D (temporal, height, width) position ids and the rotation.

Position ids
------------
* :func:`mrope_position_ids` -- text / image / video, equal bit-for-bit to ``transformers``'
  ``Qwen2VLModel.get_rope_index`` (installed 5.x behaviour; optional Qwen2.5-VL time scaling via
  ``second_per_grid_ts`` + ``tokens_per_second``; ``legacy=True`` gives the original 4.x Qwen2-VL
  rule "text after a vision span continues from the span's max position + 1", padding 1).
* :func:`omni_position_ids` -- adds audio spans and audio-in-video interleaving, equal bit-for-bit
  to ``Qwen2_5OmniPreTrainedModelForConditionalGeneration.get_rope_index``.

Both return ``(position_ids [3, B, S] (dtype of input_ids), deltas [B, 1] int64)``; deltas are
``max_position + 1 - number_of_valid_tokens`` (used to continue positions during decoding).
Positions are computed once where the data is (first pipeline stage) and passed to every stage.

Rotation
--------
megatron-core 0.16.1 already implements M-RoPE: ``MultimodalRotaryEmbedding`` (position ids
``[3, B, S]`` + ``mrope_section`` -> freqs ``[S, B, 1, dim]`` with the T/H/W channel sections
interleaved exactly like HF) and ``apply_rotary_pos_emb`` (``GPTModel(position_embedding_type=
'mrope')`` wires both).  We reuse them:

* :class:`MRoPEEmbedding` -- megatron's ``MultimodalRotaryEmbedding`` whose ``inv_freq`` is built on
  a chosen device (upstream hard-codes ``torch.cuda.current_device()``, so it cannot be built on a
  CPU-only machine); its ``forward`` is upstream's.
* :func:`mrope_freqs` -- convenience wrapper returning megatron's freqs.
* :func:`apply_mrope` -- applies the freqs to ``[S, B, H, D]`` (or THD ``[T, H, D]``).

Fused path selection (GPU): :func:`apply_mrope` takes ``fused=None`` = automatic: fused when the
tensor is on CUDA and Transformer Engine's fused RoPE is importable (megatron's
``fused_apply_rotary_pos_emb``).  M-RoPE freqs are *per token* (not per position-in-sequence), so
the fused kernel is always called in ``sbhd`` form with batch 1 per sample (packed THD ``[T, H, D]``
is viewed as ``[T, 1, H, D]`` with the per-token freqs ``[T, 1, 1, D]``; for bshd with B > 1 each
sample is rotated separately -- TE's bshd kernel only broadcasts freqs over the batch).  TE's THD
kernel is *not* used because it indexes freqs by position-inside-each-sequence.  Inside megatron's
own attention (the omni model's decoder), ``models/llama.py::transformer_config(mrope_section=...)`` sets
``TransformerConfig.mrope_section`` and turns ``apply_rope_fusion`` off: TE's bshd kernel would
get the per-token ``[S, B, 1, D]`` freqs and broadcast row 0's over the batch.  The unfused path is megatron's
``_apply_rotary_pos_emb_bshd`` and is the one verified against HF on CPU.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from megatron.core.models.common.embeddings import rope_utils as _mc_rope_utils
from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding, RotaryEmbedding

__all__ = [
    "mrope_position_ids",
    "omni_position_ids",
    "omni_audio_token_length",
    "MRoPEEmbedding",
    "mrope_freqs",
    "apply_mrope",
    "fused_mrope_available",
]


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
# Qwen2.5-Omni style position ids (audio, audio-in-video)
# --------------------------------------------------------------------------------------------


def omni_audio_token_length(audio_seqlens):
    """Qwen2.5-Omni audio tokens for ``audio_seqlens`` fbank frames (conv stride 2, pool 2)."""
    return ((audio_seqlens - 1) // 2 + 1 - 2) // 2 + 1


def _chunk_bounds(values: Tensor, tokens_per_chunk: int) -> List[Tuple[int, int]]:
    """HF ``get_chunked_index`` (monotone values, already relative), one step per chunk."""
    n = values.numel()
    bounds, start, chunk, i = [], 0, 1, 0
    while i < n:
        j = max(int(torch.searchsorted(values, chunk * tokens_per_chunk)), i)
        if j >= n:
            break
        bounds.append((start, j))
        start, chunk, i = j, chunk + 1, j + 1
    bounds.append((start, n))
    return bounds


def omni_position_ids(
    input_ids: Tensor,
    image_grid_thw: Optional[Tensor] = None,
    video_grid_thw: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    *,
    image_token_id: int,
    video_token_id: int,
    audio_token_id: int,
    vision_start_token_id: int,
    audio_start_token_id: int,
    spatial_merge_size: int,
    audio_seqlens: Optional[Tensor] = None,
    audio_token_lengths: Optional[Sequence[int]] = None,
    use_audio_in_video: bool = False,
    second_per_grids: Optional[Tensor] = None,
    position_id_per_seconds: int = 25,
    seconds_per_chunk: float = 2,
) -> Tuple[Tensor, Tensor]:
    """3D position ids like HF ``Qwen2_5OmniPreTrainedModelForConditionalGeneration.get_rope_index``.

    Audio lengths: ``audio_token_lengths`` (tokens per audio, in order) or ``audio_seqlens``
    (fbank frames; converted with :func:`omni_audio_token_length` as HF does).

    Rules (all reproduced, including HF quirks):
      * text, vision/audio start/end tokens and audio tokens advance linearly on all three axes,
        starting at ``max(previous block) + 1``;
      * image: grid positions, ``t = arange(T) * position_id_per_seconds``; video:
        ``t = long(arange(T) * second_per_grids[v] * position_id_per_seconds)`` (float32);
      * audio-in-video (``<vision_bos><audio_bos> interleaved <audio_eos><vision_eos>``): both bos
        share one position, video and audio positions start at the same offset and are interleaved
        in chunks of ``position_id_per_seconds * seconds_per_chunk`` temporal ids (HF's exact
        chunk-boundary scan), both eos share ``max(last chunk) + 1`` (max of the *last chunk*, as
        HF does, not of the whole block);
      * without image/video grids: plain cumulative positions from ``attention_mask``;
        padding positions are 1.
    """
    B, S = input_ids.shape
    device = input_ids.device
    if image_grid_thw is None and video_grid_thw is None:
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        pos = mask.long().cumsum(-1) - 1
        pos.masked_fill_(mask == 0, 1)
        pos = pos.unsqueeze(0).expand(3, -1, -1).to(device)
        maxp = pos.max(0, keepdim=False)[0].max(-1, keepdim=True)[0]
        return pos, maxp + 1 - torch.sum(mask, dim=-1, keepdim=True)

    if audio_token_lengths is None and audio_seqlens is not None:
        audio_token_lengths = omni_audio_token_length(torch.as_tensor(audio_seqlens).cpu())
    audio_lens = [int(x) for x in audio_token_lengths] if audio_token_lengths is not None else []
    img = image_grid_thw.cpu().tolist() if image_grid_thw is not None else []
    vid = video_grid_thw.cpu().tolist() if video_grid_thw is not None else []
    m = spatial_merge_size
    tokens_per_chunk = int(position_id_per_seconds * seconds_per_chunk)

    ids_cpu = input_ids.detach().cpu()
    mask_cpu = attention_mask.detach().cpu() == 1 if attention_mask is not None else None
    position_ids = torch.ones(3, B, S, dtype=input_ids.dtype)
    image_idx = video_idx = audio_idx = 0
    deltas = []
    for b in range(B):
        ids = ids_cpu[b] if mask_cpu is None else ids_cpu[b][mask_cpu[b]]
        n = ids.numel()
        where = {k: torch.nonzero(ids == tok).flatten()
                 for k, tok in (("i", image_token_id), ("v", video_token_id), ("a", audio_token_id))}
        vs = torch.nonzero(ids == vision_start_token_id).flatten()
        after_vs = ids[vs + 1]
        n_img = int((after_vs == image_token_id).sum())
        n_vid = int((after_vs == (audio_start_token_id if use_audio_in_video else video_token_id)).sum())
        n_aud = int((ids == audio_start_token_id).sum())
        remain = {"i": n_img, "v": n_vid, "a": n_aud}
        n_blocks = n_img + n_aud if use_audio_in_video else n_img + n_vid + n_aud

        parts: List[Tensor] = []

        def nxt():
            return int(parts[-1].max()) + 1 if parts else 0

        def first_at(kind, st):
            if remain[kind] <= 0 or where[kind].numel() == 0:
                return n + 1
            k = int(torch.searchsorted(where[kind], st))
            return int(where[kind][k]) if k < where[kind].numel() else n + 1  # HF would raise

        st = 0
        for _ in range(n_blocks):
            ed = {k: first_at(k, st) for k in ("i", "v", "a")}
            min_ed = min(ed.values())
            if min_ed == ed["a"]:
                kind = "a"
            elif min_ed == ed["i"]:
                kind = "i"
            else:
                kind = "v"
            if kind == "v" and use_audio_in_video:
                text_len = min_ed - st - 2
                if text_len != 0:
                    parts.append(_linear(text_len, nxt()))
                bos = _linear(1, nxt())
                parts += [bos, bos]
                start = nxt()
                a_len = audio_lens[audio_idx]
                audio_pos = _linear(a_len, start)
                t, h, w = vid[video_idx]
                t_index = (torch.arange(t) * second_per_grids[video_idx].cpu().float()
                           * position_id_per_seconds).long()
                video_pos = _grid_positions(t_index, h // m, w // m, start)
                v_chunks = _chunk_bounds(video_pos[0] - start, tokens_per_chunk)
                a_chunks = _chunk_bounds(audio_pos[0] - start, tokens_per_chunk)
                for j in range(max(len(v_chunks), len(a_chunks))):
                    if j < len(v_chunks):
                        parts.append(video_pos[:, v_chunks[j][0]:v_chunks[j][1]])
                    if j < len(a_chunks):
                        parts.append(audio_pos[:, a_chunks[j][0]:a_chunks[j][1]])
                eos = _linear(1, nxt())
                parts += [eos, eos]
                st += text_len + 4 + a_len + video_pos.shape[1]
                audio_idx += 1
                video_idx += 1
                remain["v"] -= 1
                remain["a"] -= 1
                continue
            text_len = min_ed - st - 1
            if text_len != 0:
                parts.append(_linear(text_len, nxt()))
            parts.append(_linear(1, nxt()))  # bos
            start = nxt()
            if kind == "a":
                block = _linear(audio_lens[audio_idx], start)
                audio_idx += 1
            elif kind == "i":
                t, h, w = img[image_idx]
                t_index = (torch.arange(t) * 1 * position_id_per_seconds).long()
                block = _grid_positions(t_index, h // m, w // m, start)
                image_idx += 1
            else:
                t, h, w = vid[video_idx]
                t_index = (torch.arange(t) * second_per_grids[video_idx].cpu().float()
                           * position_id_per_seconds).long()
                block = _grid_positions(t_index, h // m, w // m, start)
                video_idx += 1
            parts.append(block)
            parts.append(_linear(1, nxt()))  # eos
            st += text_len + 2 + block.shape[1]
            remain[kind] -= 1
        if st < n:
            parts.append(_linear(n - st, nxt()))
        llm_positions = torch.cat(parts, dim=1).reshape(3, -1)
        if mask_cpu is None:
            position_ids[:, b] = llm_positions
        else:
            position_ids[:, b, mask_cpu[b]] = llm_positions
        deltas.append(int(llm_positions.max()) + 1 - n)
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


def mrope_freqs(
    position_ids: Tensor,
    mrope_section: Sequence[int],
    *,
    kv_channels: int,
    rotary_base: int = 10000,
    rotary_percent: float = 1.0,
    rotary_interleaved: bool = False,
) -> Tensor:
    """megatron freqs ``[S, B, 1, rot_dim]`` for position ids ``[3, B, S]``."""
    emb = MRoPEEmbedding(kv_channels, rotary_percent, rotary_interleaved,
                         rotary_base=rotary_base, device=position_ids.device)
    return emb(position_ids, list(mrope_section))


def fused_mrope_available(t: Tensor) -> bool:
    return t.is_cuda and _mc_rope_utils.fused_apply_rotary_pos_emb is not None


def apply_mrope(
    t: Tensor,
    freqs: Tensor,
    *,
    rotary_interleaved: bool = False,
    fused: Optional[bool] = None,
) -> Tensor:
    """Rotate ``t`` with M-RoPE freqs from :func:`mrope_freqs` / :class:`MRoPEEmbedding`.

    ``t``: ``[S, B, H, D]`` with freqs ``[S, B, 1, rot_dim]``, or packed THD ``[T, H, D]`` with
    per-token freqs ``[T, 1, 1, rot_dim]`` (or ``[T, rot_dim]``).  ``fused=None`` picks TE's fused
    kernel when available on CUDA (see module docstring), otherwise megatron's unfused
    ``_apply_rotary_pos_emb_bshd`` (the path verified against HF).  Dims past ``rot_dim`` pass.
    """
    thd = t.dim() == 3
    if thd:
        t = t.unsqueeze(1)
        freqs = freqs.reshape(freqs.shape[0], 1, 1, freqs.shape[-1])
    if fused is None:
        fused = fused_mrope_available(t)
    if fused:
        fn = _mc_rope_utils.fused_apply_rotary_pos_emb
        if freqs.shape[1] == 1:
            out = fn(t, freqs, interleaved=rotary_interleaved)
        else:  # TE's sbhd kernel broadcasts freqs over batch: rotate sample by sample
            out = torch.cat(
                [fn(t[:, i : i + 1], freqs[:, i : i + 1], interleaved=rotary_interleaved)
                 for i in range(t.shape[1])], dim=1)
    else:
        out = _mc_rope_utils._apply_rotary_pos_emb_bshd(
            t, freqs, rotary_interleaved=rotary_interleaved
        )
    return out.squeeze(1) if thd else out
