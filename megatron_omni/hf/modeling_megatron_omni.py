"""MegatronOmniForCausalLM: an M2-omni model exported by megatron-omni, on transformers' own modules.

Remote code (copied into the exported folder; imports torch and transformers only):

    model.*          transformers LlamaModel (embed_tokens, layers, norm); its RoPE is M-RoPE here
    lm_head          the output projection over the omni vocabulary
    visual.*         transformers Qwen2VisionTransformerPretrainedModel (patch embed, blocks, PatchMerger):
                     megatron-omni's NaViT encoder + 2x2 merge connector is this architecture 1:1
    audio_tower.*    transformers WhisperEncoder (conv front end, layers, layer_norm), run on
                     variable-length clips (key-padding mask, zeroed padding: megatron-omni's rule), or a
                     plain-torch FunASR SANMEncoder (FunASR parameter names) for encoder_type "sanm"
    audio_connector  stack `downsample_factor` encoder frames (zero-padded tail) -> Linear -> GELU -> Linear

The i-th <image_pad> / <video_pad> / <audio_pad> embedding row is replaced by the i-th encoder token.
Positions are M-RoPE (t, h, w) ids with megatron-omni's rule (= transformers 5.x Qwen2-VL
get_rope_index): text advances linearly; an image/video span starting at p gets
(p + t, p + h, p + w) over its merged grid and the text after it continues at p + max(h, w).
Audio pads are text-like (linear).  Inputs: `pixel_values` / `image_grid_thw`,
`pixel_values_videos` / `video_grid_thw` (Qwen2-VL processor format), `input_features`
[clips, n_mels, frames] (right-padded fbank) with `audio_feature_lengths` [clips].
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaModel, LlamaRotaryEmbedding
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.models.whisper.configuration_whisper import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from .configuration_megatron_omni import MegatronOmniConfig

# --------------------------------------------------------------------------------------------
# M-RoPE


def _runs(types: torch.Tensor) -> List[Tuple[int, int, int]]:
    """Maximal runs of equal values: [(value, start, end)]."""
    n = types.numel()
    if n == 0:
        return []
    starts = [0] + (torch.nonzero(types[1:] != types[:-1]).flatten() + 1).tolist()
    return list(zip(types[starts].tolist(), starts, starts[1:] + [n]))


def omni_rope_index(input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None, *,
                    image_token_id, video_token_id, spatial_merge_size):
    """(position_ids [3, B, S], deltas [B, 1]); deltas = max position + 1 - S continues the
    positions while decoding (position = cache length + delta).  Padding positions are 0."""
    B, S = input_ids.shape
    ids_all = input_ids.detach().cpu()
    mask = attention_mask.detach().cpu().bool() if attention_mask is not None else None
    out = torch.zeros(3, B, S, dtype=torch.long)
    grids = {1: image_grid_thw.cpu().tolist() if image_grid_thw is not None else [],
             2: video_grid_thw.cpu().tolist() if video_grid_thw is not None else []}
    used = {1: 0, 2: 0}
    m = spatial_merge_size
    deltas = []
    for b in range(B):
        ids = ids_all[b] if mask is None else ids_all[b][mask[b]]
        types = (ids == image_token_id).long() + 2 * (ids == video_token_id).long()
        parts, cur = [], 0
        for kind, s, e in _runs(types):
            if kind == 0:
                parts.append(torch.arange(e - s).expand(3, -1) + cur)
                cur += e - s
                continue
            pos = s
            while pos < e:
                if used[kind] >= len(grids[kind]):
                    raise ValueError(f"more {'image' if kind == 1 else 'video'} tokens than grid_thw rows")
                t, h, w = grids[kind][used[kind]]
                used[kind] += 1
                h, w = h // m, w // m
                tt = torch.arange(t).view(-1, 1, 1).expand(t, h, w).reshape(-1)
                hh = torch.arange(h).view(1, -1, 1).expand(t, h, w).reshape(-1)
                ww = torch.arange(w).view(1, 1, -1).expand(t, h, w).reshape(-1)
                parts.append(torch.stack([tt, hh, ww]) + cur)
                cur += max(h, w)
                pos += t * h * w
            if pos != e:
                raise ValueError(f"a span of {e - s} {'image' if kind == 1 else 'video'} tokens does not match "
                                 "its grid_thw")
        pos_b = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
        if mask is None:
            out[:, b] = pos_b
        else:
            out[:, b, mask[b]] = pos_b
        deltas.append((int(pos_b.max()) + 1 if pos_b.numel() else 0) - S)
    return out.to(input_ids.device), torch.tensor(deltas, device=input_ids.device).view(B, 1)


class MRoPERotaryEmbedding(LlamaRotaryEmbedding):
    """transformers' Llama rotary (inverse frequencies incl. llama3 scaling) with 3D position ids:
    rotary frequency j takes its position from axis t, h or w by `mrope_section` (Qwen2-VL's M-RoPE)."""

    def __init__(self, config, mrope_section):
        super().__init__(config)
        self.mrope_section = list(mrope_section)
        if 2 * sum(self.mrope_section) != self.inv_freq.numel() * 2:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.inv_freq.numel()}")

    @torch.no_grad()
    def forward(self, x, position_ids):
        if position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # [3,B,S,D/2]
        freqs = torch.cat([part[i] for i, part in enumerate(freqs.split(self.mrope_section, dim=-1))], dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


# --------------------------------------------------------------------------------------------
# audio


class AudioConnector(nn.Module):
    """Stack k adjacent encoder frames (the partial last group zero-padded) -> Linear -> GELU -> Linear."""

    def __init__(self, in_size: int, k: int, hidden: int, out: int):
        super().__init__()
        self.k = k
        self.linear_fc1 = nn.Linear(in_size * k, hidden)
        self.linear_fc2 = nn.Linear(hidden, out)

    def forward(self, hidden, lengths):
        B, T, d = hidden.shape
        valid = torch.arange(T, device=hidden.device)[None, :] < lengths[:, None]
        hidden = hidden * valid[..., None].to(hidden.dtype)
        pad = (-T) % self.k
        if pad:
            hidden = F.pad(hidden, (0, 0, 0, pad))
        groups = hidden.reshape(B, (T + pad) // self.k, self.k * d)
        token_lengths = -((-lengths) // self.k)
        keep = torch.arange(groups.shape[1], device=hidden.device)[None, :] < token_lengths[:, None]
        return self.linear_fc2(F.gelu(self.linear_fc1(groups[keep])))


def whisper_config(a: dict, attn_implementation: Optional[str]) -> WhisperConfig:
    cfg = WhisperConfig(num_mel_bins=a["num_mel_bins"], d_model=a["d_model"], encoder_layers=a["encoder_layers"],
                        encoder_attention_heads=a["encoder_attention_heads"], encoder_ffn_dim=a["encoder_ffn_dim"],
                        max_source_positions=a["max_source_positions"], activation_function="gelu", dropout=0.0,
                        attention_dropout=0.0, activation_dropout=0.0)
    cfg._attn_implementation = attn_implementation or "eager"
    return cfg


def whisper_encode(enc: WhisperEncoder, features, lengths):
    """transformers' WhisperEncoder modules on right-padded clips [B, n_mels, N] of `lengths` frames:
    padded frames (and conv1 outputs) zeroed, padded keys masked -> ([B, T, d], encoder lengths)."""
    B, _, N = features.shape
    if N > 2 * enc.config.max_source_positions:
        raise ValueError(f"clip of {N} frames > 2 * max_source_positions = {2 * enc.config.max_source_positions}")
    frame_valid = (torch.arange(N, device=features.device)[None, :] < lengths[:, None]).to(features.dtype)
    x = F.gelu(enc.conv1(features * frame_valid[:, None, :])) * frame_valid[:, None, :]
    x = F.gelu(enc.conv2(x)).transpose(1, 2)  # [B, T, d]
    T = x.shape[1]
    x = x + enc.embed_positions.weight[:T].to(x.dtype)
    enc_lengths = -((-lengths) // 2)
    pad = torch.arange(T, device=x.device)[None, :] >= enc_lengths[:, None]
    mask = None
    if bool(pad.any()):
        mask = torch.zeros(B, 1, T, T, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(pad[:, None, None, :], torch.finfo(x.dtype).min)
    for layer in enc.layers:
        out = layer(x, mask)
        x = out[0] if isinstance(out, tuple) else out
    return enc.layer_norm(x), enc_lengths


def _sinusoids(length: int, channels: int) -> torch.Tensor:
    half = channels // 2
    inv = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float64))
    t = torch.arange(length, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([t.sin(), t.cos()], dim=1).float()


class _SANMAttention(nn.Module):
    def __init__(self, in_size, d, heads, kernel, shift):
        super().__init__()
        self.d, self.h = d, heads
        self.linear_q_k_v = nn.Linear(in_size, 3 * d)
        self.linear_out = nn.Linear(d, d)
        self.fsmn_block = nn.Conv1d(d, d, kernel, groups=d, bias=False)
        left = (kernel - 1) // 2 + shift
        self.pad = (left, kernel - 1 - left)

    def forward(self, x, valid):
        B, T, _ = x.shape
        q, k, v = self.linear_q_k_v(x).split(self.d, dim=-1)
        keep = valid[..., None].to(x.dtype)
        vm = (v * keep).transpose(1, 2)
        memory = (self.fsmn_block(F.pad(vm, self.pad)) + vm).transpose(1, 2) * keep
        hd = self.d // self.h
        q, k, v = (t.view(B, T, self.h, hd).transpose(1, 2) for t in (q, k, v))
        scores = ((q * hd ** -0.5) @ k.transpose(-1, -2)).masked_fill(~valid[:, None, None, :], float("-inf"))
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, self.d)
        return self.linear_out(ctx) + memory


class _FeedForward(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.w_1, self.w_2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        return self.w_2(F.relu(self.w_1(x)))


class _SANMLayer(nn.Module):
    def __init__(self, in_size, a):
        super().__init__()
        d, eps = a["d_model"], a["layernorm_epsilon"]
        self.residual = in_size == d
        self.norm1 = nn.LayerNorm(in_size, eps=eps)
        self.self_attn = _SANMAttention(in_size, d, a["num_attention_heads"], a["kernel_size"], a["sanm_shift"])
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.feed_forward = _FeedForward(d, a["ffn_hidden_size"])

    def forward(self, x, valid):
        att = self.self_attn(self.norm1(x), valid)
        x = x + att if self.residual else att
        return x + self.feed_forward(self.norm2(x))


class _CMVN(nn.Module):
    """FunASR apply_cmvn after LFR: (x + shift) * scale (am.mvn's <AddShift> / <Rescale> rows)."""

    def __init__(self, dim):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x):
        return (x + self.shift.to(x.dtype)) * self.scale.to(x.dtype)


class SANMEncoder(nn.Module):
    """FunASR SANMEncoder (Paraformer) in plain torch, FunASR parameter names (encoders0.0, encoders.i,
    after_norm), with its LFR (lfr_m, lfr_n) + CMVN front end; megatron-omni's padding rule."""

    def __init__(self, a: dict):
        super().__init__()
        self.a = a
        in_size = a["num_mel_bins"] * a["lfr_m"]
        self.cmvn = _CMVN(in_size)
        self.encoders0 = nn.ModuleList([_SANMLayer(in_size, a)])
        self.encoders = nn.ModuleList([_SANMLayer(a["d_model"], a) for _ in range(a["num_layers"] - 1)])
        self.after_norm = nn.LayerNorm(a["d_model"], eps=a["layernorm_epsilon"])

    def lfr(self, features, lengths):
        m, n = self.a["lfr_m"], self.a["lfr_n"]
        B, C, N = features.shape
        T = -(-N // n)
        j = torch.arange(T, device=features.device)[:, None] * n + torch.arange(m, device=features.device)[None, :]
        src = torch.minimum((j[None] - (m - 1) // 2).clamp(min=0), (lengths - 1).clamp(min=0)[:, None, None])
        g = torch.gather(features.transpose(1, 2), 1, src.reshape(B, T * m, 1).expand(B, T * m, C))
        return g.reshape(B, T, m * C), -((-lengths) // n)

    def forward(self, features, lengths):
        x, enc_lengths = self.lfr(features, lengths)
        x = self.cmvn(x)
        T = x.shape[1]
        valid = torch.arange(T, device=x.device)[None, :] < enc_lengths[:, None]
        x = x * math.sqrt(self.a["d_model"]) + _sinusoids(T + 1, x.shape[-1])[1:].to(x)
        for layer in list(self.encoders0) + list(self.encoders):
            x = layer(x, valid)
        return self.after_norm(x), enc_lengths


# --------------------------------------------------------------------------------------------
# the model


class MegatronOmniPreTrainedModel(PreTrainedModel):
    config_class = MegatronOmniConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = False
    _no_split_modules = ["LlamaDecoderLayer", "Qwen2VLVisionBlock", "WhisperEncoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = True


class MegatronOmniForCausalLM(MegatronOmniPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MegatronOmniConfig):
        super().__init__(config)
        text = config.text_config
        attn = getattr(config, "_attn_implementation", None)
        text._attn_implementation = attn or getattr(text, "_attn_implementation", None) or "eager"
        self.model = LlamaModel(text)
        self.model.rotary_emb = MRoPERotaryEmbedding(text, config.mrope_section)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.visual = None
        if config.vision_config is not None:
            config.vision_config._attn_implementation = text._attn_implementation
            self.visual = Qwen2VisionTransformerPretrainedModel._from_config(config.vision_config)
        self.audio_tower = self.audio_connector = None
        a = config.audio_config
        if a is not None:
            if a["encoder_type"] == "whisper":
                self.audio_tower = WhisperEncoder(whisper_config(a, text._attn_implementation))
                width = a["d_model"]
            elif a["encoder_type"] == "sanm":
                self.audio_tower = SANMEncoder(a)
                width = a["d_model"]
            else:
                raise ValueError(f"audio_config.encoder_type {a['encoder_type']!r}: expected whisper or sanm")
            self.audio_connector = AudioConnector(width, a["downsample_factor"],
                                                  a.get("connector_hidden_size") or a["out_hidden_size"],
                                                  a["out_hidden_size"])
        self.rope_deltas = None
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    # ------------------------------------------------------------------ encoders

    def encode_visual(self, pixel_values, grid_thw):
        out = self.visual(pixel_values.to(self.visual.dtype), grid_thw=grid_thw)
        return getattr(out, "pooler_output", out)

    def encode_audio(self, input_features, audio_feature_lengths=None):
        B, _, N = input_features.shape
        lengths = (audio_feature_lengths.to(input_features.device).long() if audio_feature_lengths is not None
                   else torch.full((B,), N, dtype=torch.long, device=input_features.device))
        x = input_features.to(next(self.audio_tower.parameters()).dtype)
        if isinstance(self.audio_tower, WhisperEncoder):
            hidden, enc_lengths = whisper_encode(self.audio_tower, x, lengths)
        else:
            hidden, enc_lengths = self.audio_tower(x, lengths)
        return self.audio_connector(hidden, enc_lengths)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None, input_features=None, audio_feature_lengths=None):
        x = self.model.embed_tokens(input_ids)
        image = video = audio = None
        if pixel_values is not None or pixel_values_videos is not None:
            if self.visual is None:
                raise ValueError("images/videos given but this model has no vision tower")
            parts = [(p, g) for p, g in ((pixel_values, image_grid_thw), (pixel_values_videos, video_grid_thw))
                     if p is not None]
            out = self.encode_visual(torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts]).long())
            m2 = self.config.vision_config.spatial_merge_size ** 2
            n_img = int(image_grid_thw.long().prod(-1).sum()) // m2 if pixel_values is not None else 0
            image = out[:n_img] if pixel_values is not None else None
            video = out[n_img:] if pixel_values_videos is not None else None
        if input_features is not None:
            if self.audio_tower is None:
                raise ValueError("audio given but this model has no audio encoder")
            audio = self.encode_audio(input_features, audio_feature_lengths)
        for name, pad_id, tokens in (("<image_pad>", self.config.image_token_id, image),
                                     ("<video_pad>", self.config.video_token_id, video),
                                     ("<audio_pad>", self.config.audio_token_id, audio)):
            slots = input_ids == pad_id
            n_slots, n_tokens = int(slots.sum()), 0 if tokens is None else tokens.shape[0]
            if n_slots != n_tokens:
                raise ValueError(f"{n_slots} {name} tokens in input_ids but the encoder produced {n_tokens} tokens")
            if n_tokens:
                x = x.masked_scatter(slots[..., None].to(x.device), tokens.to(x.dtype))
        return x

    # ------------------------------------------------------------------ positions

    def get_rope_index(self, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None):
        merge = self.config.vision_config.spatial_merge_size if self.config.vision_config is not None else 2
        return omni_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask,
                               image_token_id=self.config.image_token_id, video_token_id=self.config.video_token_id,
                               spatial_merge_size=merge)

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        ids = model_kwargs.get("input_ids", inputs_tensor)
        if ids is None or ids.dim() != 2 or ids.dtype not in (torch.int, torch.long):
            return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        position_ids, self.rope_deltas = self.get_rope_index(
            ids, model_kwargs.get("image_grid_thw"), model_kwargs.get("video_grid_thw"),
            model_kwargs.get("attention_mask"))
        return position_ids

    def _positions(self, input_ids, position_ids, attention_mask, past_len, S, B, device, grids):
        if position_ids is not None:
            if position_ids.dim() == 3:
                return position_ids
            if past_len and self.rope_deltas is not None:  # 2D text positions while decoding
                position_ids = position_ids + self.rope_deltas.to(position_ids.device)
            return position_ids[None].expand(3, -1, -1)
        if past_len == 0 or self.rope_deltas is None:
            if input_ids is None:
                pos = torch.arange(past_len, past_len + S, device=device)
                return pos.view(1, 1, -1).expand(3, B, -1)
            position_ids, self.rope_deltas = self.get_rope_index(input_ids, *grids, attention_mask)
            return position_ids
        pos = torch.arange(past_len, past_len + S, device=device).view(1, -1) + self.rope_deltas.to(device)
        return pos[None].expand(3, -1, -1)

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, input_features=None, audio_feature_lengths=None,
                logits_to_keep=0, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                                       input_features, audio_feature_lengths)
        B, S = inputs_embeds.shape[:2]
        text = self.config.text_config
        if use_cache is None:
            use_cache = not self.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=text)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        position_ids = self._positions(input_ids, position_ids, attention_mask, past_len, S, B, inputs_embeds.device,
                                       (image_grid_thw, video_grid_thw))
        mask = create_causal_mask(config=text, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  past_key_values=past_key_values, position_ids=None)
        hidden = inputs_embeds
        rotary = self.model.rotary_emb(hidden, position_ids)
        for layer in self.model.layers[: text.num_hidden_layers]:
            out = layer(hidden, attention_mask=mask, position_embeddings=rotary, past_key_values=past_key_values,
                        use_cache=use_cache, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = self.model.norm(hidden)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=text.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)


__all__ = ["MegatronOmniForCausalLM", "MegatronOmniPreTrainedModel", "omni_rope_index", "MRoPERotaryEmbedding"]
