#!/usr/bin/env python
"""Build the omni demo data set: deterministic, a few MB, no download.

    python tools/make_demo_data.py --out data/demo [--seed 0]

Then every demo stage takes ``data.root=data/demo`` (blends: configs/data/{pt1,pt2,pt3,it1,it2,it3,at}.yaml).

Layout under --out (one JSONL manifest per source, media paths relative to --out):

    manifests/caption.jsonl        image captions of rendered shapes (PIL), jpg + png
    manifests/ocr.jsonl            words rendered on paper-like backgrounds, answer = the text
    manifests/interleaved.jsonl    image-text documents with two inline images
    manifests/text.jsonl           pure text (bundled stdlib-docstring corpus)
    manifests/instruct.jsonl       text-only instruction turns (arithmetic, counting)
    manifests/video_qa.jsonl       moving shapes, VP9 (.webm) and H.264 (.mp4)
    manifests/audio_caption.jsonl  tones / noise / chords with descriptions, opus + wav
    manifests/audio_qa.jsonl       "how many beeps" clips
    manifests/asr.jsonl            speech via espeak-ng - only when espeak-ng is installed
    manifests/gen_image.jsonl      caption-as-image-generation answers (<gen_image>...</gen_image>)
    manifests/speech_gen.jsonl     speech answers as audio codes (synthetic codes: no CosyVoice tokenizer here)
    manifests/dpo.jsonl            preference pairs (correct vs wrong description)
    manifests/rlqa_image.jsonl     verifiable QA (GSPO stage): colour of the shape (exact match)
    manifests/rlqa_video.jsonl     verifiable QA: direction of motion, option letter (multiple choice)
    manifests/rlqa_audio.jsonl     verifiable QA: number of beeps (numeric)
    manifests/rlqa_text.jsonl      verifiable QA: one-digit sums (numeric)

Verifiable QA rows (task ``verifiable_qa``) ask for "Answer: <x>" and carry the checkable answer in
``metadata.answer`` (+ ``metadata.choices`` for multiple choice); the GSPO blend
(configs/data/gspo.yaml) names the reward rules of each source (megatron_omni/rl/rewards.py).
Their assistant turn is the reference answer, so the same rows also train by SFT (IT-3's blend has them:
the tiny GSPO stage then starts from a policy that has seen the answer format).

Every byte is a function of --seed, except the H.264 files (libx264 is not bit-reproducible
across processes; see megatron_omni/data/media/synth.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_omni.data.manifest import read_manifest  # noqa: E402
from megatron_omni.data.media.synth import write_audio, write_image, write_video  # noqa: E402

SAMPLE_RATE = 16000
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 210, 40),
    "purple": (140, 60, 170), "orange": (240, 140, 30), "black": (20, 20, 20), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
PLACES = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
          "bottom right": (0.75, 0.75), "center": (0.5, 0.5)}
WORDS = ("omni", "vision", "audio", "megatron", "token", "pixel", "signal", "model", "train", "batch", "frame",
         "sample", "stage", "blend", "tensor", "shard", "layer", "expert", "merge", "patch")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")

# Per-source sample counts: small enough to build in seconds, enough for a held-out split.
COUNTS = {"caption": 24, "ocr": 12, "interleaved": 6, "text": 24, "instruct": 16, "video_qa": 8,
          "audio_caption": 12, "audio_qa": 8, "asr": 6, "gen_image": 12, "speech_gen": 8, "dpo": 8,
          "rlqa_image": 8, "rlqa_video": 6, "rlqa_audio": 8, "rlqa_text": 16}
ANSWER_FORMAT = "Reply as 'Answer: <{}>'."  # the format reward's default pattern (rl/rewards.py)


# -- drawing ---------------------------------------------------------------------------------------

def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=color)


def _shape_scene(rng: random.Random) -> Tuple[np.ndarray, str, dict]:
    """One shape on a plain background; returns (rgb, caption, attributes)."""
    w, h = rng.choice([(112, 84), (140, 112), (168, 112), (84, 140), (196, 140)])
    color, bg = rng.sample([c for c in COLORS], 2)
    shape, place = rng.choice(SHAPES), rng.choice(list(PLACES))
    image = Image.new("RGB", (w, h), COLORS[bg])
    fx, fy = PLACES[place]
    _draw_shape(ImageDraw.Draw(image), shape, fx * w, fy * h, min(w, h) * 0.18, COLORS[color])
    caption = f"{_a(color).capitalize()} {shape} in the {place} of {_a(bg)} background."
    return np.asarray(image), caption, {"color": color, "shape": shape, "place": place, "background": bg,
                                        "width": w, "height": h}


def _text_image(text: str, rng: random.Random) -> np.ndarray:
    font = ImageFont.load_default(size=18)
    left, top, right, bottom = font.getbbox(text)
    w = (right - left + 24 + 1) // 2 * 2
    h = (bottom - top + 24 + 1) // 2 * 2
    shade = rng.randint(225, 250)
    image = Image.new("RGB", (w, h), (shade, shade, shade - 10))
    ImageDraw.Draw(image).text((12 - left, 12 - top), text, fill=(15, 15, 15), font=font)
    return np.asarray(image)


def _moving_clip(rng: random.Random, frames: int) -> Tuple[np.ndarray, str]:
    color, bg = rng.sample([c for c in COLORS], 2)
    shape = rng.choice(SHAPES)
    direction = rng.choice(["left to right", "right to left", "top to bottom", "bottom to top"])
    w, h = 112, 84
    out = np.empty((frames, h, w, 3), np.uint8)
    for t in range(frames):
        a = t / max(1, frames - 1)
        x, y = {"left to right": (0.15 + 0.7 * a, 0.5), "right to left": (0.85 - 0.7 * a, 0.5),
                "top to bottom": (0.5, 0.15 + 0.7 * a), "bottom to top": (0.5, 0.85 - 0.7 * a)}[direction]
        image = Image.new("RGB", (w, h), COLORS[bg])
        _draw_shape(ImageDraw.Draw(image), shape, x * w, y * h, 12, COLORS[color])
        out[t] = np.asarray(image)
    return out, f"{_a(color).capitalize()} {shape} moves from {direction} over {_a(bg)} background."


# -- audio -----------------------------------------------------------------------------------------

def _tone(freq: float, seconds: float, amplitude: float = 0.4) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)  # 10 ms ramps: no clicks
    return (amplitude * np.sin(2 * np.pi * freq * t) * fade).astype(np.float32)


def _audio_scene(rng: random.Random, np_rng: np.random.RandomState) -> Tuple[np.ndarray, str]:
    kind = rng.choice(["tone", "noise", "chord", "sweep"])
    seconds = rng.choice([1.0, 1.5, 2.0])
    if kind == "tone":
        freq = rng.choice([220, 330, 440, 660, 880])
        return _tone(freq, seconds), f"A steady {freq} Hz tone lasting {seconds:g} seconds."
    if kind == "noise":
        wave = (0.2 * np_rng.standard_normal(int(seconds * SAMPLE_RATE))).clip(-1, 1).astype(np.float32)
        return wave, f"White noise lasting {seconds:g} seconds."
    if kind == "chord":
        base = rng.choice([220, 262, 294])
        wave = sum(_tone(base * r, seconds, 0.2) for r in (1.0, 1.25, 1.5))
        return wave.astype(np.float32), f"A major chord rooted at {base} Hz lasting {seconds:g} seconds."
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0, f1 = (200.0, 2000.0) if rng.random() < 0.5 else (2000.0, 200.0)
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * seconds))
    word = "rising" if f1 > f0 else "falling"
    return (0.4 * np.sin(phase)).astype(np.float32), f"A {word} sweep between 200 and 2000 Hz over {seconds:g} seconds."


def _beeps(n: int) -> np.ndarray:
    gap = np.zeros(int(0.15 * SAMPLE_RATE), np.float32)
    parts = [gap]
    for _ in range(n):
        parts += [_tone(1000, 0.12), gap]
    return np.concatenate(parts)


def _speech(text: str, path: str) -> bool:
    """Synthesize `text` with a local espeak-ng into `path` (.wav); False when it is not installed."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return False
    subprocess.run([exe, "-v", "en-us", "-s", "150", "-w", path, text], check=True, capture_output=True)
    return True


# -- manifests -------------------------------------------------------------------------------------

class _Writer:
    def __init__(self, out: str):
        self.out = out
        self.rows: Dict[str, List[dict]] = {}

    def path(self, rel: str) -> str:
        full = os.path.join(self.out, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        return full

    def add(self, source: str, row: dict) -> None:
        self.rows.setdefault(source, []).append(row)

    def flush(self) -> Dict[str, int]:
        for source, rows in self.rows.items():
            with open(self.path(f"manifests/{source}.jsonl"), "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        return {s: len(r) for s, r in self.rows.items()}


def _chat(user: str, answer: str, **assistant) -> List[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer, **assistant}]


def _image_sources(w: _Writer, rng: random.Random) -> None:
    questions = ["Describe the image.", "What is in this picture?", "Write a short caption for this image."]
    for i in range(COUNTS["caption"]):
        rgb, caption, attrs = _shape_scene(rng)
        rel = f"images/caption_{i:03d}.{'png' if i % 4 == 3 else 'jpg'}"
        write_image(w.path(rel), rgb)
        w.add("caption", {"id": f"caption-{i:03d}", "task": "caption", "modality": "image", "media": [rel],
                          "conversations": _chat(f"<image>{rel}</image>\n{rng.choice(questions)}", caption),
                          "metadata": attrs})
    for i in range(COUNTS["ocr"]):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        rel = f"images/ocr_{i:03d}.png"
        write_image(w.path(rel), _text_image(text, rng))
        w.add("ocr", {"id": f"ocr-{i:03d}", "task": "ocr", "modality": "image", "media": [rel],
                      "conversations": _chat(f"<image>{rel}</image>\nWhat text is written in the image?", text)})
    for i in range(COUNTS["interleaved"]):
        rels, captions = [], []
        for k in range(2):
            rgb, caption, _ = _shape_scene(rng)
            rel = f"images/interleaved_{i:03d}_{k}.jpg"
            write_image(w.path(rel), rgb)
            rels.append(rel)
            captions.append(caption)
        text = (f"Two pictures follow. <image>{rels[0]}</image> The first shows: {captions[0]} "
                f"<image>{rels[1]}</image> The second shows: {captions[1]}")
        w.add("interleaved", {"id": f"interleaved-{i:03d}", "task": "interleaved", "modality": "image",
                              "media": rels, "text": text})
    for i in range(COUNTS["gen_image"]):
        _, caption, attrs = _shape_scene(rng)
        request = f"Please draw {caption[0].lower()}{caption[1:-1]}."
        answer = f"Here is the picture you asked for. <gen_image>{caption}</gen_image>"
        w.add("gen_image", {"id": f"gen-image-{i:03d}", "task": "gen_image", "modality": "text",
                            "conversations": _chat(request, answer), "metadata": attrs})
    for i in range(COUNTS["dpo"]):
        rgb, caption, attrs = _shape_scene(rng)
        rel = f"images/dpo_{i:03d}.jpg"
        write_image(w.path(rel), rgb)
        wrong_color = rng.choice([c for c in COLORS if c not in (attrs["color"], attrs["background"])])
        rejected = caption.replace(_a(attrs["color"]).capitalize(), _a(wrong_color).capitalize(), 1)
        w.add("dpo", {"id": f"dpo-{i:03d}", "task": "dpo", "modality": "image", "media": [rel],
                      "conversations": [{"role": "user", "content": f"<image>{rel}</image>\nDescribe the image."}],
                      "chosen": caption, "rejected": rejected})


def _text_sources(w: _Writer, rng: random.Random) -> None:
    from megatron_omni.data import DEMO_TEXT_CORPUS  # the bundled corpus (PSF-licensed docstrings)

    with open(DEMO_TEXT_CORPUS, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    picks = sorted(rng.sample(range(len(docs)), COUNTS["text"]))
    for i, d in enumerate(picks):
        w.add("text", {"id": f"text-{i:03d}", "task": "text", "modality": "text", "text": docs[d][:1200]})
    for i in range(COUNTS["instruct"]):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        if i % 2:
            q, ans = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        else:
            word = rng.choice(WORDS)
            q, ans = f"How many letters are in the word '{word}'?", f"The word '{word}' has {len(word)} letters."
        w.add("instruct", {"id": f"instruct-{i:03d}", "task": "instruct", "modality": "text",
                           "conversations": [{"role": "system", "content": "You are a concise assistant."}]
                           + _chat(q, ans)})


def _video_source(w: _Writer, rng: random.Random) -> None:
    for i in range(COUNTS["video_qa"]):
        frames = rng.choice([8, 12, 16])
        clip, description = _moving_clip(rng, frames)
        codec, ext = ("vp9", "webm") if i % 2 == 0 else ("h264", "mp4")
        rel = f"videos/video_{i:03d}.{ext}"
        write_video(w.path(rel), clip, fps=8.0, codec=codec)
        w.add("video_qa", {"id": f"video-{i:03d}", "task": "video_qa", "modality": "video", "media": [rel],
                           "conversations": _chat(f"<video>{rel}</video>\nWhat happens in the video?", description),
                           "metadata": {"duration": frames / 8.0, "fps": 8.0, "codec": codec}})


def _audio_sources(w: _Writer, rng: random.Random, np_rng: np.random.RandomState) -> Optional[str]:
    for i in range(COUNTS["audio_caption"]):
        wave, description = _audio_scene(rng, np_rng)
        rel = f"audio/caption_{i:03d}.{'wav' if i % 3 == 2 else 'opus'}"
        write_audio(w.path(rel), wave, SAMPLE_RATE)
        w.add("audio_caption", {"id": f"audio-caption-{i:03d}", "task": "audio_caption", "modality": "audio",
                                "media": [rel], "metadata": {"duration": len(wave) / SAMPLE_RATE},
                                "conversations": _chat(f"<audio>{rel}</audio>\nDescribe the content of this audio.",
                                                       description)})
    for i in range(COUNTS["audio_qa"]):
        n = rng.randint(1, 5)
        wave = _beeps(n)
        rel = f"audio/beeps_{i:03d}.opus"
        write_audio(w.path(rel), wave, SAMPLE_RATE)
        w.add("audio_qa", {"id": f"audio-qa-{i:03d}", "task": "audio_qa", "modality": "audio", "media": [rel],
                           "metadata": {"duration": len(wave) / SAMPLE_RATE},
                           "conversations": _chat(f"<audio>{rel}</audio>\nHow many beeps do you hear?",
                                                  f"I hear {NUMBER_WORDS[n]} beep{'s' if n > 1 else ''}.")})
    for i in range(COUNTS["speech_gen"]):
        word = rng.choice(WORDS)
        # Synthetic stand-in for CosyVoice speech tokens (none available offline): a deterministic
        # code sequence per character, so the format and the loss path are exercised.
        codes = [(ord(c) * 37 + k * 11) % 256 for k, c in enumerate(word * 3)]
        w.add("speech_gen", {"id": f"speech-gen-{i:03d}", "task": "speech_gen", "modality": "audio",
                             "conversations": _chat(f"Say the word '{word}' out loud.", f"{word.capitalize()}.",
                                                    audio_codes=codes),
                             "metadata": {"audio_codes": "synthetic"}})
    if shutil.which("espeak-ng") is None:
        return "espeak-ng not installed: no speech (asr) samples"
    for i in range(COUNTS["asr"]):
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))).capitalize() + "."
        rel = f"audio/speech_{i:03d}.wav"
        _speech(sentence, w.path(rel))
        w.add("asr", {"id": f"asr-{i:03d}", "task": "asr", "modality": "audio", "media": [rel],
                      "conversations": _chat(f"<audio>{rel}</audio>\nTranscribe the speech.", sentence)})
    return None


def _options(choices: List[str]) -> str:
    return " ".join(f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(choices))


def _verifiable(w: _Writer, source: str, i: int, modality: str, user: str, answer: str, media=(), **metadata) -> None:
    w.add(source, {"id": f"{source.replace('_', '-')}-{i:03d}", "task": "verifiable_qa", "modality": modality,
                   "media": list(media), "conversations": _chat(user, f"Answer: {answer}"),
                   "metadata": {"answer": answer, **metadata}})


def _verifiable_sources(w: _Writer, seed: int) -> None:
    """Questions whose answers a rule checks (GSPO stage), one generator per modality."""
    rng = random.Random(f"{seed}-rlqa-image")
    for i in range(COUNTS["rlqa_image"]):
        rgb, _, attrs = _shape_scene(rng)
        rel = f"images/rlqa_{i:03d}.jpg"
        write_image(w.path(rel), rgb)
        _verifiable(w, "rlqa_image", i, "image", f"<image>{rel}</image>\nWhat colour is the {attrs['shape']}? "
                    f"{ANSWER_FORMAT.format('colour')}", attrs["color"], [rel])
    rng = random.Random(f"{seed}-rlqa-video")
    directions = ["left to right", "right to left", "top to bottom", "bottom to top"]
    for i in range(COUNTS["rlqa_video"]):
        clip, description = _moving_clip(rng, 8)
        rel = f"videos/rlqa_{i:03d}.webm"
        write_video(w.path(rel), clip, fps=8.0, codec="vp9")
        letter = next(chr(ord("A") + k) for k, d in enumerate(directions) if d in description)
        _verifiable(w, "rlqa_video", i, "video", f"<video>{rel}</video>\nWhich way does the shape move? "
                    f"{_options(directions)} {ANSWER_FORMAT.format('letter')}", letter, [rel], choices=directions,
                    duration=1.0, fps=8.0)
    rng = random.Random(f"{seed}-rlqa-audio")
    for i in range(COUNTS["rlqa_audio"]):
        n = rng.randint(1, 4)
        wave = _beeps(n)
        rel = f"audio/rlqa_{i:03d}.wav"
        write_audio(w.path(rel), wave, SAMPLE_RATE)
        _verifiable(w, "rlqa_audio", i, "audio", f"<audio>{rel}</audio>\nHow many beeps do you hear? "
                    f"{ANSWER_FORMAT.format('number')}", str(n), [rel], duration=len(wave) / SAMPLE_RATE)
    rng = random.Random(f"{seed}-rlqa-text")
    for i in range(COUNTS["rlqa_text"]):  # one-digit sums (2..8): a tiny policy's guess is sometimes right
        a, b = rng.randint(1, 4), rng.randint(1, 4)
        _verifiable(w, "rlqa_text", i, "text", f"What is {a} plus {b}? {ANSWER_FORMAT.format('number')}", str(a + b))


def build_demo_data(out: str, seed: int = 0) -> Dict[str, int]:
    """Write the demo set under `out` (replacing a previous one); returns samples per source."""
    for sub in ("manifests", "images", "videos", "audio"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    w = _Writer(out)
    # One generator per part: adding samples to one source never changes another's.
    _image_sources(w, random.Random(f"{seed}-image"))
    _text_sources(w, random.Random(f"{seed}-text"))
    _video_source(w, random.Random(f"{seed}-video"))
    note = _audio_sources(w, random.Random(f"{seed}-audio"), np.random.RandomState(seed))
    _verifiable_sources(w, seed)
    counts = w.flush()
    for source in counts:  # what we wrote must pass the loader's own validation
        read_manifest(os.path.join(out, "manifests", f"{source}.jsonl"))
    if note:
        print(f"make_demo_data: {note}")
    return counts


def tree_digest(root: str, skip_ext: Tuple[str, ...] = ()) -> Dict[str, str]:
    """SHA-1 of every file under `root` (relative path -> hex), for determinism checks."""
    digests = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(skip_ext):
                continue
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                digests[os.path.relpath(full, root)] = hashlib.sha1(f.read()).hexdigest()
    return dict(sorted(digests.items()))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (the stages' data.root)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    counts = build_demo_data(args.out, args.seed)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    print(f"wrote {sum(counts.values())} samples ({', '.join(f'{k} {v}' for k, v in counts.items())}) "
          f"to {args.out}: {size / 1e6:.2f} MB in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
