"""MegatronOmniProcessor: text with image / video / audio inputs -> MegatronOmniForCausalLM's inputs, exactly as
megatron-omni's sample builder (data/sample_builder.py + chat_template.py + media/) makes them in training.

Remote code (copied into the exported folder next to the modeling file; imports torch, numpy, PIL and
transformers only -- never megatron_omni).  The media rules below restate megatron-omni's (the same way
the modeling file restates its M-RoPE rule) and tests/convert/test_omni_export_processor.py holds them
equal to the originals:

    images   aspect-kept resize to multiples of patch * merge (28 px) within `max_image_tokens` merged
             tokens (media/geometry.py image_grid: Qwen2-VL smart_resize, no aspect-ratio refusal), PIL
             bicubic, repeated to temporal_patch_size frames, CLIP-normalised, Qwen2-VL patch order
             (media/patches.py frames_to_patches)
    videos   the given frames sampled uniformly (min(frames, max_video_frames), padded to a multiple of
             temporal_patch_size by repeating the last), the clip's `max_video_tokens` split evenly over
             its temporal groups (media/geometry.py plan_video, "uniform"), then as images
    audio    mono float waveform in [-1, 1] at 16 kHz -> Kaldi log-mel fbank on int16-scaled samples
             (media/fbank.py), [clips, num_mel_bins, frames] right-padded + `audio_feature_lengths`
    tokens   `<image>...</image>` (likewise video / audio) in the text is one medium, taken in order from
             `images` / `videos` / `audio`; it becomes <image> + <image_pad> x n + </image>, n = the
             encoder's token count (t*h*w / merge^2; audio: ceil(ceil(frames / stride) / downsample)).

Text is tokenized the way the chat template does it: special tokens (`<|eot_id|>`, `<gen_image>`, speech
codes ...) are single ids, and the text between them is encoded piece by piece without added specials
(the `\\n\\n` that ends a header is its own piece), so `apply_chat_template` + `__call__` reproduces the
training token ids.  M-RoPE positions are not returned: the model derives them from input_ids, the
grids and attention_mask (modeling_megatron_omni.omni_rope_index).
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin

MEDIA_KINDS = ("image", "video", "audio")
_MEDIA_REF = re.compile(r"<(image|video|audio)>(.*?)</\1>", re.S)
# A media marker or pad token left after the references are taken out: a malformed reference.
_STRAY_MARKER = re.compile(r"</?(image|video|audio)>|<(image|video|audio)_pad>")
_HEADER_END = "<|end_header_id|>"
# Paper Fig. 3 system prompt (megatron_omni/data/chat_template.py DEFAULT_SYSTEM_PROMPT; written into
# processor_config.json at export, this is only the fallback).
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language, vision and audio assistant. You are able to understand the visual and audio "
    "content that the user provides, and assist the user with a variety of tasks using natural language."
)
# Fewest LLM tokens one temporal group of video frames may get (media/geometry.py MIN_TOKENS_PER_FRAME_GROUP).
_MIN_TOKENS_PER_FRAME_GROUP = 4


class MediaInputError(ValueError):
    """An input the processor cannot turn into model inputs (the message names the item and the fix)."""


# --------------------------------------------------------------------------------------------
# images and videos


def image_grid(height: int, width: int, cell: int, max_tokens: int, min_tokens: int = 4) -> Tuple[int, int]:
    """Resized (H, W): multiples of `cell` = patch * merge, (H/cell)*(W/cell) <= max_tokens, aspect kept."""
    if height <= 0 or width <= 0:
        raise MediaInputError(f"image size must be positive, got {height}x{width}")
    max_pixels, min_pixels = max_tokens * cell * cell, min(min_tokens, max_tokens) * cell * cell
    h_bar = max(cell, round(height / cell) * cell)
    w_bar = max(cell, round(width / cell) * cell)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(cell, math.floor(height / beta / cell) * cell)
        w_bar = max(cell, math.floor(width / beta / cell) * cell)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / cell) * cell
        w_bar = math.ceil(width * beta / cell) * cell
    if (h_bar // cell) * (w_bar // cell) > max_tokens:  # a side clamped up to one cell overshot: cut the longer
        if h_bar >= w_bar:
            h_bar = max(1, max_tokens // (w_bar // cell)) * cell
        else:
            w_bar = max(1, max_tokens // (h_bar // cell)) * cell
    return h_bar, w_bar


def uniform_frame_indices(total: int, max_frames: int, max_tokens: int, temporal_patch_size: int) -> List[int]:
    """Frames sampled from a clip of `total` frames (plan_video "uniform"), padded to whole temporal groups."""
    tps = temporal_patch_size
    if max_frames < tps:
        raise MediaInputError(f"max_video_frames={max_frames} is below temporal_patch_size={tps}")
    if max_tokens < _MIN_TOKENS_PER_FRAME_GROUP:
        raise MediaInputError(f"max_video_tokens={max_tokens} is below {_MIN_TOKENS_PER_FRAME_GROUP}")
    count = min(total, max_frames // tps * tps, max_tokens // _MIN_TOKENS_PER_FRAME_GROUP * tps)
    indices = np.linspace(0, total - 1, count).round().astype(np.int64).tolist()
    return indices + [indices[-1]] * (-count % tps)


def _rgb_frame(item, what: str):
    """A PIL image (EXIF orientation applied, as the training decoder does) or an [H, W, 3] uint8 array
    (numpy / torch) -> PIL RGB image."""
    from PIL import Image, ImageOps

    if isinstance(item, Image.Image):
        return ImageOps.exif_transpose(item).convert("RGB")
    array = item.numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise MediaInputError(f"{what}: expected a PIL image or an [H, W, 3] uint8 array, got {array.dtype} "
                              f"{tuple(array.shape)}")
    return Image.fromarray(array)


def _resized(frame, size: Tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if frame.size != (size[1], size[0]):  # PIL's bicubic, as transformers' Qwen2-VL image processor
        frame = frame.resize((size[1], size[0]), resample=Image.Resampling.BICUBIC)
    return np.asarray(frame)


def frames_to_patches(frames: torch.Tensor, v: Dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """[T, H, W, C] uint8 -> (pixel_values [N, C*T*P*P], grid_thw [1, 3]) in the 2x2 merger's patch order."""
    t, h, w, c = frames.shape
    p, m, tps = v["patch_size"], v["merge_size"], v["temporal_patch_size"]
    mean = torch.tensor(v["image_mean"], dtype=torch.float32)
    std = torch.tensor(v["image_std"], dtype=torch.float32)
    x = (frames.float() / 255.0 - mean) / std
    gt, gh, gw = t // tps, h // p, w // p
    x = x.reshape(gt, tps, gh // m, m, p, gw // m, m, p, c).permute(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return x.reshape(gt * gh * gw, c * tps * p * p).contiguous(), torch.tensor([[gt, gh, gw]], dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# audio


def _fbank_sizes(a: Dict) -> Tuple[int, int]:
    rate = a["sampling_rate"]
    return int(rate * a["frame_length_ms"] / 1000), int(rate * a["frame_shift_ms"] / 1000)


def fbank_frame_count(num_samples: int, a: Dict) -> int:
    window, shift = _fbank_sizes(a)
    return 0 if num_samples < window else 1 + (num_samples - window) // shift


@lru_cache(maxsize=8)
def _mel_banks(num_mel_bins: int, fft_size: int, sample_rate: int) -> torch.Tensor:
    mel = lambda hz: 1127.0 * math.log(1.0 + hz / 700.0)  # noqa: E731
    low, high = mel(20.0), mel(sample_rate / 2.0)
    edges = low + (high - low) / (num_mel_bins + 1) * torch.arange(num_mel_bins + 2, dtype=torch.float64)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bin_mel = 1127.0 * torch.log1p(torch.arange(fft_size // 2, dtype=torch.float64) * (sample_rate / fft_size)
                                   / 700.0)[None, :]
    weights = torch.clamp(torch.minimum((bin_mel - left) / (center - left), (right - bin_mel) / (right - center)), 0.0)
    return torch.cat([weights, torch.zeros(num_mel_bins, 1, dtype=torch.float64)], dim=1)  # Nyquist bin: 0


def kaldi_fbank(wave: torch.Tensor, a: Dict) -> torch.Tensor:
    """[samples] float waveform in [-1, 1] -> [frames, num_mel_bins] float32 Kaldi log-mel fbank (float64 math:
    Povey window, per-frame DC removal, pre-emphasis 0.97, power spectrum, mel 20 Hz..Nyquist, log floored)."""
    window, shift = _fbank_sizes(a)
    fft_size = 1 << (window - 1).bit_length()
    x = (wave.to(torch.float64) * a["wave_scale"]).unfold(0, window, shift)
    x = x - x.mean(dim=1, keepdim=True)
    x = torch.cat([x[:, :1] * (1.0 - 0.97), x[:, 1:] - 0.97 * x[:, :-1]], dim=1)
    n = torch.arange(window, dtype=torch.float64)
    x = x * (0.5 - 0.5 * torch.cos(2 * math.pi * n / (window - 1))).pow(0.85)
    power = torch.fft.rfft(x, n=fft_size).abs().pow(2)
    mel = power @ _mel_banks(a["num_mel_bins"], fft_size, a["sampling_rate"]).T
    return torch.clamp(mel, min=torch.finfo(torch.float32).eps).log().float()


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def audio_token_count(frames: int, a: Dict) -> int:
    """ceil(encoder frames / downsample_factor); encoder frames = ceil(frames / stride) (Whisper conv2
    stride, or SAN-M's LFR hop lfr_n)."""
    stride = a["conv2_stride"] if a["encoder_type"] == "whisper" else a["lfr_n"]
    return _ceil_div(_ceil_div(frames, stride), a["downsample_factor"])


# --------------------------------------------------------------------------------------------
# the processor


class MegatronOmniProcessor(ProcessorMixin):
    """`processor(text=..., images=..., videos=..., audio=...)` -> input_ids, attention_mask, pixel_values,
    image_grid_thw, pixel_values_videos, video_grid_thw, input_features, audio_feature_lengths.

    `text`: a string or a list of strings (a batch, padded on the tokenizer's padding_side); media are
    taken in reference order across the batch.  `apply_chat_template(messages)` renders the M2-omni
    template (paper Fig. 3); message content is a string (with `<image>..</image>` references) or a list
    of {"type": "text" | "image" | "video" | "audio"} parts.  Limits (`max_image_tokens`,
    `max_video_frames`, `max_video_tokens`) default to processor_config.json's and can be given per call.
    """

    def __init__(self, tokenizer=None, vision=None, audio=None, max_image_tokens=2560, max_video_frames=128,
                 max_video_tokens=None, system_prompt=DEFAULT_SYSTEM_PROMPT, chat_template=None, **kwargs):
        super().__init__(tokenizer, chat_template=chat_template)
        self.vision = vision
        self.audio = audio
        self.max_image_tokens = max_image_tokens
        self.max_video_frames = max_video_frames
        self.max_video_tokens = max_video_tokens
        self.system_prompt = system_prompt
        specials = sorted(tokenizer.get_added_vocab(), key=len, reverse=True) if tokenizer is not None else []
        self._special = re.compile("|".join(re.escape(s) for s in specials)) if specials else None

    # ------------------------------------------------------------------ tokens

    def token_id(self, name: str) -> int:
        got = self.tokenizer.convert_tokens_to_ids(name)
        if got is None or got == self.tokenizer.unk_token_id:
            raise MediaInputError(f"the tokenizer has no {name!r} token: this folder's tokenizer is not the omni one "
                                  "(re-export with mcore-to-hf)")
        return got

    def _encode_text(self, text: str) -> List[int]:
        """Specials as single ids; the text between them encoded piece by piece (a header's \\n\\n apart)."""
        ids: List[int] = []
        pos = 0
        matches = list(self._special.finditer(text)) if self._special is not None else []
        for m in matches + [None]:
            piece = text[pos:m.start()] if m is not None else text[pos:]
            if pos and text[:pos].endswith(_HEADER_END) and piece.startswith("\n\n"):
                ids += self.tokenizer.encode("\n\n", add_special_tokens=False)
                piece = piece[2:]
            if piece:
                ids += self.tokenizer.encode(piece, add_special_tokens=False)
            if m is not None:
                ids.append(self.tokenizer.convert_tokens_to_ids(m.group(0)))
                pos = m.end()
        return ids

    # ------------------------------------------------------------------ media

    def _limits(self, kwargs) -> Tuple[int, int, int]:
        image = kwargs.pop("max_image_tokens", None) or self.max_image_tokens
        frames = kwargs.pop("max_video_frames", None) or self.max_video_frames
        video = kwargs.pop("max_video_tokens", None) or self.max_video_tokens or image
        return image, frames, video

    def _need(self, section: str, kind: str) -> Dict:
        cfg = getattr(self, section)
        if cfg is None:
            raise MediaInputError(f"{kind} given, but this model has no {section} encoder")
        return cfg

    def _image(self, item, i: int, max_tokens: int):
        v = self._need("vision", "an image")
        frame = _rgb_frame(item, f"images[{i}]")
        size = image_grid(frame.size[1], frame.size[0], v["patch_size"] * v["merge_size"], max_tokens)
        pixels = torch.from_numpy(_resized(frame, size).copy())
        return frames_to_patches(pixels[None].expand(v["temporal_patch_size"], -1, -1, -1), v)

    def _video(self, item, i: int, max_frames: int, max_tokens: int):
        v = self._need("vision", "a video")
        frames = [_rgb_frame(f, f"videos[{i}] frame {j}") for j, f in enumerate(item)]
        if not frames:
            raise MediaInputError(f"videos[{i}] has no frames")
        if len({f.size for f in frames}) != 1:
            raise MediaInputError(f"videos[{i}]: frames differ in size ({sorted({f.size for f in frames})})")
        indices = uniform_frame_indices(len(frames), max_frames, max_tokens, v["temporal_patch_size"])
        groups = len(indices) // v["temporal_patch_size"]
        width, height = frames[0].size
        size = image_grid(height, width, v["patch_size"] * v["merge_size"], max_tokens // groups,
                          min_tokens=_MIN_TOKENS_PER_FRAME_GROUP)
        resized = {j: _resized(frames[j], size) for j in set(indices)}
        return frames_to_patches(torch.from_numpy(np.stack([resized[j] for j in indices])), v)

    def _audio(self, item, i: int, sampling_rate: int) -> torch.Tensor:
        a = self._need("audio", "audio")
        if sampling_rate != a["sampling_rate"]:
            raise MediaInputError(f"audio[{i}] is at {sampling_rate} Hz; the model's front end takes "
                                  f"{a['sampling_rate']} Hz: resample first (e.g. torchaudio.functional.resample) "
                                  "and pass sampling_rate=16000")
        wave = torch.as_tensor(np.asarray(item.numpy() if isinstance(item, torch.Tensor) else item), dtype=torch.float32)
        if wave.dim() != 1:
            raise MediaInputError(f"audio[{i}]: expected a mono 1-D waveform, got shape {tuple(wave.shape)} "
                                  "(downmix by averaging the channels)")
        frames = fbank_frame_count(wave.numel(), a)
        if frames == 0:
            raise MediaInputError(f"audio[{i}] is too short: {wave.numel()} samples is less than one "
                                  f"{a['frame_length_ms']} ms fbank window")
        if frames > a["max_input_frames"]:
            raise MediaInputError(f"audio[{i}] is too long: {frames} fbank frames exceed the encoder's "
                                  f"{a['max_input_frames']}; split the clip")
        return kaldi_fbank(wave, a)

    # ------------------------------------------------------------------ call

    def __call__(self, text=None, images=None, videos=None, audio=None, *, sampling_rate: int = 16000,
                 return_tensors="pt", **kwargs) -> BatchFeature:
        if text is None:
            raise MediaInputError("text is required: reference each medium in it as <image></image>, "
                                  "<video></video> or <audio></audio>")
        texts = [text] if isinstance(text, str) else list(text)
        given = {"image": _as_list(images), "video": _as_list(videos), "audio": _as_list(audio)}
        refs = {k: sum(1 for t in texts for m in _MEDIA_REF.finditer(t) if m.group(1) == k) for k in MEDIA_KINDS}
        for kind in MEDIA_KINDS:
            if refs[kind] != len(given[kind]):
                arg = "images" if kind == "image" else "videos" if kind == "video" else "audio"
                raise MediaInputError(f"the text references {refs[kind]} {kind}(s) (<{kind}>...</{kind}>) but "
                                      f"{len(given[kind])} were given in `{arg}`: write one <{kind}></{kind}> per "
                                      f"item, in the order of `{arg}`")
        max_image, max_frames, max_video = self._limits(kwargs)
        if kwargs:
            raise TypeError(f"unexpected keyword argument(s) {sorted(kwargs)}")
        out: Dict[str, torch.Tensor] = {}
        counts: Dict[str, List[int]] = {k: [] for k in MEDIA_KINDS}
        if given["image"]:
            parts = [self._image(x, i, max_image) for i, x in enumerate(given["image"])]
            out["pixel_values"], out["image_grid_thw"] = (torch.cat([p[j] for p in parts]) for j in (0, 1))
        if given["video"]:
            parts = [self._video(x, i, max_frames, max_video) for i, x in enumerate(given["video"])]
            out["pixel_values_videos"], out["video_grid_thw"] = (torch.cat([p[j] for p in parts]) for j in (0, 1))
        m2 = self.vision["merge_size"] ** 2 if self.vision else 1
        for kind, key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
            counts[kind] = (out[key].prod(-1) // m2).tolist() if key in out else []
        if given["audio"]:
            feats = [self._audio(x, i, sampling_rate) for i, x in enumerate(given["audio"])]
            lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
            batch = torch.zeros(len(feats), int(lengths.max()), feats[0].shape[1])
            for i, f in enumerate(feats):
                batch[i, : f.shape[0]] = f
            out["input_features"], out["audio_feature_lengths"] = batch.transpose(1, 2).contiguous(), lengths
            counts["audio"] = [audio_token_count(int(n), self.audio) for n in lengths]
        rows = [self._expand(t, b, counts) for b, t in enumerate(texts)]
        out.update(self._pad(rows))
        return BatchFeature(data=out, tensor_type=None)

    def _expand(self, text: str, b: int, counts: Dict[str, List[int]]) -> List[int]:
        stray = _STRAY_MARKER.search(_MEDIA_REF.sub("", text))
        if stray:
            raise MediaInputError(f"text[{b}] has a {stray.group(0)} outside a <kind>...</kind> reference: write "
                                  "each medium as <image></image> / <video></video> / <audio></audio> (the processor "
                                  "inserts the pad tokens)")
        ids, pos = [], 0
        for m in _MEDIA_REF.finditer(text):
            kind = m.group(1)
            ids += self._encode_text(text[pos:m.start()])
            ids += ([self.token_id(f"<{kind}>")] + [self.token_id(f"<{kind}_pad>")] * counts[kind].pop(0)
                    + [self.token_id(f"</{kind}>")])
            pos = m.end()
        return ids + self._encode_text(text[pos:])

    def _pad(self, rows: List[List[int]]) -> Dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        for b, r in enumerate(rows):
            span = slice(width - len(r), width) if left else slice(0, len(r))
            ids[b, span], mask[b, span] = torch.tensor(r, dtype=torch.long), 1
        return {"input_ids": ids, "attention_mask": mask}

    # ------------------------------------------------------------------ chat template

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = False,
                            images=None, videos=None, audio=None, **kwargs):
        """The M2-omni template (megatron_omni/data/chat_template.py): <|begin_of_text|>, a system turn (the
        first message's if it is one, else `system_prompt`), each turn as <|start_header_id|>role
        <|end_header_id|>\\n\\n content <|eot_id|>; an assistant message may carry `audio_codes` (speech
        answer: <audio_gen> <|a_i|>... </audio_gen>).  `add_generation_prompt` appends the assistant header.
        tokenize=True returns `self(text=..., images=..., videos=..., audio=...)`."""
        turns = list(conversation)
        system = self.system_prompt
        if turns and turns[0]["role"] == "system":
            system = _content(turns.pop(0), 0)
        parts = ["<|begin_of_text|>"]
        if system is not None:
            parts.append(f"<|start_header_id|>system{_HEADER_END}\n\n{system.strip()}<|eot_id|>")
        for i, turn in enumerate(turns):
            role = turn["role"]
            if role not in ("user", "assistant"):
                raise MediaInputError(f"message {i}: role {role!r} must be user or assistant (system only comes first)")
            body = _content(turn, i).strip()
            if role == "assistant" and _MEDIA_REF.search(body):
                raise MediaInputError(f"message {i}: assistant turns cannot reference input media; move it to a "
                                      "user turn")
            codes = turn.get("audio_codes")
            if codes:
                if role != "assistant":
                    raise MediaInputError(f"message {i}: audio_codes belong on assistant turns (speech answers)")
                body += "<audio_gen>" + "".join(f"<|a_{int(c)}|>" for c in codes) + "</audio_gen>"
            parts.append(f"<|start_header_id|>{role}{_HEADER_END}\n\n{body}<|eot_id|>")
        if add_generation_prompt:
            parts.append(f"<|start_header_id|>assistant{_HEADER_END}\n\n")
        rendered = "".join(parts)
        if not tokenize:
            return rendered
        return self(text=rendered, images=images, videos=videos, audio=audio, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                "video_grid_thw", "input_features", "audio_feature_lengths"]


def _as_list(items) -> list:
    if items is None:
        return []
    return list(items) if isinstance(items, (list, tuple)) else [items]


def _content(message: Dict, i: int) -> str:
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            out.append(part.get("text", ""))
        elif kind in MEDIA_KINDS:
            out.append(f"<{kind}></{kind}>")
        else:
            raise MediaInputError(f"message {i}: content part type {kind!r}; use text, image, video or audio")
    return "".join(out)


__all__ = ["MegatronOmniProcessor", "MediaInputError"]
