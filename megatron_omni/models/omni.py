"""The M2-omni model (paper Sec. 2.1, Fig. 2): encoders + connectors + the Llama backbone.

`OmniModel` *is* megatron-core's `GPTModel` (same parameter names, same pipeline behaviour, so
checkpoints, HF conversion of the LLM and the bare-LLM benchmark carry over) with, on the first
pipeline stage only, a NaViT vision encoder (`vision.*`) and an audio encoder (`audio.*`) whose
connector outputs replace the placeholder tokens of the token stream:

    tokens   ... <image> <image_pad> x n <image/> ... <audio> <audio_pad> x k </audio> ...
    embed    word embeddings; the i-th <image_pad>/<video_pad>/<audio_pad> row := i-th encoder token

Later stages receive hidden states only.  Positions are M-RoPE (t, h, w) ids computed on the data
side; the rotation is megatron's `MultimodalRotaryEmbedding` (`models/rope.py`).  Packed rows
(several samples per row, `OmniMicrobatch.cu_seqlens`) attend within their sample only, by the path
`model.packed_attention` selects (`models/packed_attention.py`):

* THD (`te`, `torch`): the microbatch's B rows run as one packed stream of T = B*S tokens (batch 1:
  tokens [1, T], positions [3, 1, T], hidden states [T, 1, H] between pipeline stages) with
  `PackedSeqParams(qkv_format="thd")` and `AttnMaskType.padding_causal`; megatron's THD rotary
  applies the per-token M-RoPE freqs (freqs.size(0) == cu_seqlens[-1]: mapped by token offset);
  the core attention is TE's or `PackedCoreAttention`.  No S x S tensor exists.
* `dense` (the reference): [B, S] rows with the block-diagonal causal mask of
  `data.packing.packed_attention_mask` and `AttnMaskType.arbitrary`.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from megatron_omni.config.schema import OMNI_MODULES, ModelConfig, OmniConfig, ParallelConfig
from megatron_omni.data.packing import packed_attention_mask
from megatron_omni.config.encoders import audio_token_count
from megatron_omni.models.kernels import detect_kernels
from megatron_omni.models.llama import gpt_model_kwargs
from megatron_omni.models.omni_vocab import OmniVocab
from megatron_omni.models.packed_attention import packed_attention_spec, resolve_packed_attention, thd_packed_seq_params
from megatron_omni.models.rope import MRoPEEmbedding
from megatron_omni.parallel.context_parallel import cp_item_range, gather_cp_media_tokens

log = logging.getLogger(__name__)

# Parameter-name prefixes of the freezable modules (OMNI_MODULES); "llm" is everything else.
_MODULE_PREFIXES: Dict[str, Sequence[str]] = {
    "vision_encoder": ("vision.patch_embed.", "vision.decoder."),
    "vision_connector": ("vision.merger.",),
    "audio_encoder": ("audio.",),  # minus the connector, see module_of
    "audio_connector": ("audio.connector.",),
}


def module_of(param_name: str) -> str:
    """Which OMNI_MODULES entry a parameter (name relative to OmniModel) belongs to."""
    if param_name.startswith("audio.connector."):
        return "audio_connector"
    for module, prefixes in _MODULE_PREFIXES.items():
        if param_name.startswith(tuple(prefixes)):
            return module
    return "llm"


def omni_vocab(model: ModelConfig, omni: OmniConfig) -> OmniVocab:
    """The LLM vocabulary of an omni run: the text tokenizer's ids + omni specials + audio codes."""
    return OmniVocab(model.vocab_size, omni.audio_codebook_size)


class OmniModel(GPTModel):
    """GPTModel + first-stage encoders.  `forward` takes the `OmniMicrobatch` fields."""

    def __init__(self, *, omni: OmniConfig, vocab: OmniVocab, packed_attention: str = "dense", **gpt_kwargs):
        """`gpt_kwargs`: GPTModel's arguments (`build_omni_chunks` gives them) with a TransformerConfig
        built for M-RoPE (`models/llama.py::transformer_config(mrope_section=omni.mrope_section)`).
        Nothing passed in is modified: the layer spec of the packed path is a new one."""
        config = gpt_kwargs["config"]
        head_dim = config.kv_channels
        if sum(omni.mrope_section) * 2 != head_dim:
            raise ValueError(f"omni.mrope_section {omni.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
        if list(config.mrope_section or ()) != list(omni.mrope_section):
            raise ValueError(f"the TransformerConfig's mrope_section {config.mrope_section} is not omni.mrope_section "
                             f"{omni.mrope_section}: build it with transformer_config(..., mrope_section=...) "
                             "(build_omni_chunks does)")
        # Packed rows attend inside their samples: a block-diagonal mask (dense) or THD segments.
        spec = packed_attention_spec(gpt_kwargs["transformer_layer_spec"], packed_attention)
        # M-RoPE replaces Llama's 1D RoPE (Sec. 2.1 "M2-omni LLM"), so GPTModel builds no rotary of its
        # own ("none"); the omni model's is added below.  megatron's `MultimodalRotaryEmbedding` (what
        # position_embedding_type="mrope" builds) would not give the same numbers: it has no Llama-3.1
        # frequency scaling, and under context parallelism it slices the freqs as BSHD chunks.
        super().__init__(**{**gpt_kwargs, "transformer_layer_spec": spec, "position_embedding_type": "none"})
        self.packed_attention = packed_attention  # te | torch | dense (resolve_packed_attention)
        # GPTModel.forward's M-RoPE branch: freqs = rotary_pos_emb(position_ids [3, B, S], mrope_section).
        self.position_embedding_type = "mrope"
        self.mrope_section = config.mrope_section
        # The backbone's Llama-3.1 frequency scaling carries over (text positions stay the LLM's RoPE).
        # No CP slice of the freqs (it would miss the THD 2*cp chunks): under context parallelism the
        # positions cover the whole padded stream and megatron's THD rotary maps them to this rank's
        # chunks by segment offset (`_get_thd_freqs_on_this_cp_rank`).
        self.rotary_pos_emb = MRoPEEmbedding(
            kv_channels=head_dim, rotary_base=gpt_kwargs.get("rotary_base", 10000),
            rope_scaling=gpt_kwargs.get("rope_scaling", False),
            rope_scaling_factor=gpt_kwargs.get("rope_scaling_factor", 8.0), cp_group=None)
        self.vocab = vocab
        self.omni = omni
        self.vision = self.audio = None
        if self.pre_process:  # encoders live with the embedding on the first stage (vp stage 0)
            dtype = config.params_dtype
            if omni.vision is not None:
                from megatron_omni.models.vision.encoder import NaViTEncoder

                self.vision = NaViTEncoder(omni.vision, params_dtype=dtype, packed_attention=packed_attention)
            if omni.audio is not None:
                from megatron_omni.models.audio.whisper import build_audio_encoder

                self.audio = build_audio_encoder(omni.audio, params_dtype=dtype)

    # ------------------------------------------------------------------ embedding

    def _encode_visual(self, pixel_values: Optional[Tensor], grid_thw: Optional[Tensor],
                       pixel_values_videos: Optional[Tensor], video_grid_thw: Optional[Tensor],
                       cp_group=None, dtype: Optional[torch.dtype] = None):
        """One NaViT pass over the images and videos of the microbatch -> (image tokens, video tokens).
        With `cp_group` this rank encodes only its share of the items (`cp_item_range`) and the
        outputs (cast to `dtype`) are all-gathered over the CP group."""
        parts = [(p, g) for p, g in ((pixel_values, grid_thw), (pixel_values_videos, video_grid_thw)) if p is not None]
        if not parts:
            return None, None
        if self.vision is None:
            raise ValueError("the microbatch has images/videos but omni.vision is null")
        pixels, grids = torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts]).long()
        m2 = self.vision.cfg.spatial_merge_size ** 2
        if cp_group is None:
            out = self.vision(pixels, grids)
        else:  # grids are host metadata in training: the share is planned without a device sync
            patches = grids.prod(-1).tolist()
            item_tokens = [n // m2 for n in patches]
            lo, hi = cp_item_range(item_tokens, cp_group.size(), cp_group.rank())
            local = (self.vision(pixels[sum(patches[:lo]):sum(patches[:hi])], grids[lo:hi]).to(dtype) if hi > lo
                     else _empty_rows(self.vision, self.config.hidden_size, dtype, pixels.device))
            out = gather_cp_media_tokens(local, item_tokens, cp_group)
        # grid_thw is host metadata in training (training/stage_inputs.py): no device sync
        n_img = int(grid_thw.long().prod(-1).sum()) // m2 if pixel_values is not None else 0
        return (out[:n_img] if pixel_values is not None else None,
                out[n_img:] if pixel_values_videos is not None else None)

    def _encode_audio(self, features: Tensor, lengths: Optional[Tensor], cp_group=None,
                      dtype: Optional[torch.dtype] = None) -> Tensor:
        """Audio tokens of the microbatch's clips (features [B, N, n_mels]); with `cp_group` this
        rank encodes its share of the clips and the outputs are all-gathered, as `_encode_visual`."""
        if self.audio is None:
            raise ValueError("the microbatch has audio but omni.audio is null")
        if cp_group is None:
            # Float16Module casts positional inputs only: media keywords arrive fp32 and each encoder
            # casts them itself (SAN-M after its fp32 CMVN; the vision encoder likewise).
            return self.audio(features.transpose(1, 2), lengths)[0]
        if lengths is None:
            lengths = torch.full((features.shape[0],), features.shape[1], dtype=torch.long)
        item_tokens = [int(audio_token_count(int(n), self.omni.audio)) for n in lengths.tolist()]  # host
        lo, hi = cp_item_range(item_tokens, cp_group.size(), cp_group.rank())
        local = (self.audio(features[lo:hi].transpose(1, 2), lengths[lo:hi])[0].to(dtype) if hi > lo
                 else _empty_rows(self.audio, self.config.hidden_size, dtype, features.device))
        return gather_cp_media_tokens(local, item_tokens, cp_group)

    def embed_multimodal(
        self,
        input_ids: Tensor,
        *,
        pixel_values: Optional[Tensor] = None,
        image_grid_thw: Optional[Tensor] = None,
        pixel_values_videos: Optional[Tensor] = None,
        video_grid_thw: Optional[Tensor] = None,
        audio_features: Optional[Tensor] = None,
        audio_lengths: Optional[Tensor] = None,
        placeholder_counts: Optional[Dict[int, int]] = None,
        token_index: Optional[Tensor] = None,
    ) -> Tensor:
        """Decoder input [S, B, H] (sequence-parallel scattered when SP is on).  `placeholder_counts`
        ({pad id: count}, `OmniMicrobatch.count_placeholders`) spares counting the slots on the device.
        `token_index` (context parallelism, THD [T, 1, H]): keep these rows of the filled stream (index T =
        a zero pad row); the encoders then split the media over the CP ranks (no duplicated encoder
        work) and all-gather their outputs before the placeholders are filled."""
        emb = self.embedding(input_ids=input_ids, position_ids=None)  # [S, B, H], not scattered
        x = emb.transpose(0, 1)
        counts = placeholder_counts or {}
        # context parallelism: each CP rank encodes its share of the media, the outputs all-gathered
        cp_group = parallel_state.get_context_parallel_group() if token_index is not None else None
        image, video = self._encode_visual(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                                           cp_group, x.dtype)
        audio = None
        if audio_features is not None:
            audio = self._encode_audio(audio_features, audio_lengths, cp_group, x.dtype)
        for name, pad_id, tokens in (("<image_pad>", self.vocab.image_pad_id, image),
                                     ("<video_pad>", self.vocab.video_pad_id, video),
                                     ("<audio_pad>", self.vocab.audio_pad_id, audio)):
            slots = input_ids == pad_id
            n_slots = counts[pad_id] if pad_id in counts else int(slots.sum())
            n_tokens = 0 if tokens is None else tokens.shape[0]
            if n_slots != n_tokens:
                raise ValueError(
                    f"{n_slots} {name} tokens in the microbatch but the encoder produced {n_tokens} "
                    "tokens; placeholder spans must be expanded with the model's token-count functions")
            if n_tokens:
                x = x.masked_scatter(slots.unsqueeze(-1), tokens.to(x.dtype))
        emb = x.transpose(0, 1).contiguous()
        if token_index is not None:
            emb = index_with_pad(emb, token_index)
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb

    @property
    def packed_thd(self) -> bool:
        """Packed rows run as THD (one stream of B*S tokens), not with a dense mask."""
        return self.packed_attention != "dense"

    def pipeline_tensor_shape(self, seq_length: int, micro_batch_size: int):
        """(sequence, batch) of the hidden states sent between pipeline stages: THD runs the
        microbatch's rows as one stream of batch 1."""
        return (seq_length * micro_batch_size, 1) if self.packed_thd else (seq_length, micro_batch_size)

    def packed_row_attention(self, cu_seqlens: Tensor, batch_size: int, seq_length: int
                             ) -> Tuple[Optional[Tensor], Optional[PackedSeqParams]]:
        """(attention_mask, packed_seq_params) for `forward` on [batch_size, seq_length] packed rows
        with these segment boundaries (`OmniMicrobatch.cu_seqlens`, a host tensor): the THD
        parameters, or the dense block-diagonal mask.  Training builds them per microbatch in
        training/stage_inputs.py."""
        if self.packed_thd:
            device = torch.cuda.current_device()
            return None, thd_packed_seq_params(cu_seqlens, cu_seqlens.to(device), self.packed_attention)
        return packed_attention_mask(cu_seqlens, batch_size, seq_length), None

    def forward(self, input_ids: Optional[Tensor], position_ids: Tensor, attention_mask: Optional[Tensor],
                labels: Optional[Tensor] = None, packed_seq_params: Optional[PackedSeqParams] = None,
                inference_context=None, runtime_gather_output: Optional[bool] = None,
                **media: Optional[Tensor]) -> Tensor:
        """GPTModel.forward with `media` = the OmniMicrobatch media fields (`embed_multimodal`'s
        keywords), used by the first stage; later stages get hidden states from the pipeline.
        With `packed_seq_params` (THD) the [B, S] rows run as one [1, B*S] stream and the per-token
        loss comes back as [B, S]; `attention_mask` is then None.  `inference_context` /
        `runtime_gather_output`: megatron's KV-cache generation (`megatron_omni.inference`), which
        gives an explicit [B, 1, s, S] mask on either path; during decoding `position_ids` cover
        every cached column."""
        B, S = position_ids.shape[1:]
        if self.packed_thd and packed_seq_params is None and inference_context is None:
            raise ValueError(f"this model runs packed rows as THD (model.packed_attention={self.packed_attention}): "
                             "pass packed_seq_params (OmniModel.packed_row_attention gives them), not a dense mask")
        if packed_seq_params is not None:
            input_ids = input_ids.reshape(1, B * S) if input_ids is not None else None
            position_ids = position_ids.reshape(3, 1, B * S)
            labels = labels.reshape(1, B * S) if labels is not None else None
        split = getattr(packed_seq_params, "cp_split", None)
        if split is None:
            decoder_input = self.embed_multimodal(input_ids, **media) if self.pre_process else None
            out = super().forward(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                  labels=labels, packed_seq_params=packed_seq_params,
                                  inference_context=inference_context, runtime_gather_output=runtime_gather_output)
        else:  # context parallelism: this rank's tokens of the padded stream (parallel/context_parallel.py)
            decoder_input = (self.embed_multimodal(input_ids, token_index=split.local_index, **media)
                             if self.pre_process else None)
            local = (lambda t: None if t is None else index_with_pad(t[0], split.local_index).unsqueeze(0))
            stream_positions = index_with_pad(position_ids[:, 0].t(), split.stream_index).t().unsqueeze(1)
            out = super().forward(local(input_ids), stream_positions, attention_mask, decoder_input=decoder_input,
                                  labels=local(labels), packed_seq_params=packed_seq_params)
            if self.post_process:  # back to the stream's places, zero where another rank holds the token
                out = out[0].new_zeros(B * S + 1, *out.shape[2:]).index_add(0, split.local_index, out[0])
                out = out[:B * S].unsqueeze(0)
        if packed_seq_params is not None and self.post_process:  # loss [1, T] / logits [1, T, V]
            out = out.reshape(B, S, *out.shape[2:])
        return out


def _empty_rows(encoder: torch.nn.Module, hidden: int, dtype: torch.dtype, device) -> Tensor:
    """[0, hidden] encoder output of a CP rank with no media item to encode, tied to a trainable
    parameter so that this rank takes part in the all-gather's backward like the others."""
    rows = torch.zeros(0, hidden, dtype=dtype, device=device)
    trainable = next((p for p in encoder.parameters() if p.requires_grad), None)
    return rows if trainable is None else rows + trainable.reshape(-1)[:1].sum().to(dtype) * 0


def index_with_pad(x: Tensor, index: Tensor) -> Tensor:
    """Rows `index` of x [T, ...]; index T (a pad token of the CP split) gives a zero row."""
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])]).index_select(0, index)


def build_omni_chunks(
    model: ModelConfig, parallel: ParallelConfig, omni: OmniConfig, *, seq_length: int,
    params_dtype: torch.dtype,
) -> List[OmniModel]:
    """This rank's OmniModel chunk(s): the Llama backbone with the omni vocabulary, encoders on the
    first (virtual) stage.  Encoders are sized to the LLM width (`out_hidden_size`)."""
    for name, enc in (("vision", omni.vision), ("audio", omni.audio)):
        if enc is not None and enc.out_hidden_size != model.hidden_size:
            raise ValueError(f"omni.{name}.out_hidden_size={enc.out_hidden_size} must equal "
                             f"model.hidden_size={model.hidden_size} (the connector projects to the LLM width)")
    vocab = omni_vocab(model, omni)
    packed = resolve_packed_attention(model.packed_attention, detect_kernels(model.transformer_impl).transformer_engine)
    kwargs = gpt_model_kwargs(model, parallel, seq_length=seq_length, params_dtype=params_dtype,
                              vocab_size=vocab.size, mrope_section=omni.mrope_section)
    # The omni model scatters to sequence-parallel regions itself, after the placeholders are filled.
    return [OmniModel(omni=omni, vocab=vocab, packed_attention=packed, scatter_embedding_sequence_parallel=False, **kw)
            for kw in kwargs]


def apply_freeze(chunks: Sequence[torch.nn.Module], freeze: Sequence[str]) -> Dict[str, int]:
    """requires_grad=False on the named OMNI_MODULES (before DDP wrapping, so frozen parameters get
    no gradient buffer and no optimizer state).  Returns trainable parameter counts per module."""
    for name in freeze:
        if name not in OMNI_MODULES:
            raise ValueError(f"cannot freeze unknown module {name!r}; choose from {list(OMNI_MODULES)}")
    trainable = {m: 0 for m in OMNI_MODULES}
    for chunk in chunks:
        for pname, param in chunk.named_parameters():
            module = module_of(pname)
            if module in freeze:
                param.requires_grad_(False)
            elif param.requires_grad:
                trainable[module] += param.numel()
    return trainable


def init_omni_weights_layout_invariant(chunks: Sequence[OmniModel], model: ModelConfig, omni: OmniConfig,
                                       seed: int) -> None:
    """Layout-invariant init (models/init.py) of the backbone -- the same weights a bare GPTModel with
    this vocabulary gets -- and of each encoder under its own name prefix and init std."""
    from megatron_omni.models.init import init_encoder_layout_invariant, init_weights_layout_invariant

    init_weights_layout_invariant(chunks, model, seed, vocab_size=omni_vocab(model, omni).size,
                                  skip_prefixes=("vision.", "audio."))
    for chunk in chunks:
        if chunk.vision is not None:
            init_encoder_layout_invariant(chunk.vision, "vision.", omni.vision.init_method_std, seed)
        if chunk.audio is not None:
            init_encoder_layout_invariant(chunk.audio, "audio.", omni.audio.init_method_std, seed)
