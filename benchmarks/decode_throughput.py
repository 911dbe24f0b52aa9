"""Media decode throughput: DALI (CPU operators) vs PyAV, video and audio, on this machine.

    python benchmarks/decode_throughput.py [--data DIR] [--min-seconds 2] [--no-synthetic]

DIR is the demo data folder (tools/make_demo_data.py --out DIR): its videos/*.webm (VP9), videos/*.mp4
(H.264) and audio/* files.  The demo clips are tiny (8-16 frames of ~100 px), so a synthetic set of
realistic size is also generated into a temp folder with megatron_omni.data.media.synth (unless
--no-synthetic): 2 VP9 + 2 H.264 clips of 48 frames at 360x640, and four 10 s audio clips.

Rows (every decoder single-threaded, batch 1, one file at a time, as the omni loader calls them):
  video decode   all frames of every clip to uint8 RGB at full size: frames/s and clips/s
                 DALI CPU (VP9) vs PyAV (VP9), and PyAV (H.264; DALI's CPU decoder has no H.264)
  load_video     the whole media path: probe, sample <= 16 frames, decode, resize to <= 1280 tokens, patchify
  audio decode   decode to float mono at the file's rate: DALI vs PyAV (torchaudio.load needs torchcodec,
                 which is not a dependency, so PyAV is the non-DALI decoder)
  load_audio     decode + resample to 16 kHz (torchaudio) + 80-bin Kaldi fbank
Ratios are against the PyAV row of the same file set, measured in the same run.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from megatron_omni.data.media import load_audio, load_video, synth  # noqa: E402
from megatron_omni.data.media.pyav_decode import decode_audio as pyav_decode_audio  # noqa: E402
from megatron_omni.data.media.pyav_decode import probe_video  # noqa: E402
from megatron_omni.config.encoders import AudioConfig, VisionConfig  # noqa: E402


def timed_group(contenders: Dict[str, Callable[[], int]], min_seconds: float) -> Dict[str, tuple]:
    """Time contenders in alternation (the machine is shared: load drifts, alternating spreads it
    evenly); each fn returns a unit count.  Returns {name: (median seconds per pass, units per pass)}
    over >= 3 passes after one warm-up pass (pipeline builds, codec init, page cache)."""
    units = {name: fn() for name, fn in contenders.items()}
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    start = time.perf_counter()
    while len(times[next(iter(times))]) < 3 or time.perf_counter() - start < min_seconds * len(contenders):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), units[name]) for name in contenders}


def dali_full_decoder():
    """A decode-only DALI video pipeline (all frames, no resize): the raw decoder speed."""
    from nvidia.dali import Pipeline, fn, types

    pipe = Pipeline(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_dynamic=True)
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        pipe.set_outputs(fn.decoders.video(encoded, device="cpu"))
    pipe.build()

    def decode(data: bytes) -> int:
        (out,) = pipe.run(encoded=[np.frombuffer(data, dtype=np.uint8)])
        return int(np.array(out[0]).shape[0])

    return decode


def pyav_full_decode(data: bytes) -> int:
    import io

    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # as in megatron_omni.data.media.pyav_decode
        return sum(1 for frame in container.decode(stream) if frame.to_ndarray(format="rgb24") is not None)


def synthetic_set(root: str) -> Dict[str, List[str]]:
    rng = np.random.default_rng(0)
    files: Dict[str, List[str]] = {"vp9": [], "h264": [], "audio": []}
    for i in range(2):
        clip = synth.smooth_clip(48, 360, 640)
        clip = np.clip(clip.astype(np.int16) + rng.integers(-6, 7, clip.shape), 0, 255).astype(np.uint8)
        for codec, ext in (("vp9", "webm"), ("h264", "mp4")):
            path = os.path.join(root, f"clip{i}.{ext}")
            synth.write_video(path, clip, fps=24.0, codec=codec)
            files[codec].append(path)
    for ext, rate in ((".wav", 16000), (".flac", 44100), (".opus", 48000), (".ogg", 44100)):
        wave = synth.chirp(10.0, rate, f0=80.0, f1=6000.0, amplitude=0.4)
        wave = (wave + 0.01 * rng.standard_normal(wave.shape)).astype(np.float32)
        path = os.path.join(root, f"speech{ext}")
        synth.write_audio(path, wave, rate)
        files["audio"].append(path)
    return files


def demo_set(root: str) -> Dict[str, List[str]]:
    audio = sorted(p for ext in ("wav", "flac", "opus", "ogg") for p in glob.glob(os.path.join(root, "audio", f"*.{ext}")))
    return {"vp9": sorted(glob.glob(os.path.join(root, "videos", "*.webm"))),
            "h264": sorted(glob.glob(os.path.join(root, "videos", "*.mp4"))), "audio": audio}


def bench_set(name: str, files: Dict[str, List[str]], min_seconds: float) -> List[tuple]:
    from megatron_omni.data import dali

    vision, audio_cfg = VisionConfig(), AudioConfig()
    blobs = {k: [open(p, "rb").read() for p in v] for k, v in files.items()}
    rows = []  # (set, what, backend, files, frames per pass or None, seconds per pass)

    def group(what_backend_fn: List[tuple], n_files: int, counts_frames: bool = True):
        if not n_files:
            return
        results = timed_group({f"{w}|{b}": fn for w, b, fn in what_backend_fn}, min_seconds)
        for what, backend, _ in what_backend_fn:
            seconds, units = results[f"{what}|{backend}"]
            rows.append((name, what, backend, n_files, units if counts_frames else None, seconds))

    have_dali = dali.available()
    vp9, h264 = blobs["vp9"], blobs["h264"]
    contenders = [("video decode VP9", "pyav", lambda: sum(pyav_full_decode(b) for b in vp9))]
    if have_dali:
        decode = dali_full_decoder()
        contenders.append(("video decode VP9", "dali-cpu", lambda: sum(decode(b) for b in vp9)))
    group(contenders, len(vp9))
    group([("video decode H.264", "pyav", lambda: sum(pyav_full_decode(b) for b in h264))], len(h264))

    def loads(paths, backend):
        def run():
            total = 0
            for p in paths:
                out = load_video(p, vision=vision, max_frames=16, max_tokens=1280, backend=backend)
                total += int(out.grid_thw[0, 0]) * vision.temporal_patch_size
            return total
        return run

    contenders = [("load_video VP9", "pyav", loads(files["vp9"], "pyav"))]
    if have_dali:
        contenders.append(("load_video VP9", "dali-cpu", loads(files["vp9"], "dali")))
    group(contenders, len(files["vp9"]))
    group([("load_video H.264", "pyav", loads(files["h264"], "pyav"))], len(files["h264"]))

    aud = blobs["audio"]
    contenders = [("audio decode", "pyav", lambda: sum(pyav_decode_audio(b)[0].size > 0 for b in aud))]
    if have_dali:
        contenders.append(("audio decode", "dali-cpu", lambda: sum(dali.decode_audio(b)[0].numel() > 0 for b in aud)))
    group(contenders, len(aud), counts_frames=False)
    contenders = [("load_audio (fbank)", "dali-cpu" if b == "dali" else "pyav",
                   lambda b=b: sum(load_audio(p, audio=audio_cfg, backend=b).shape[0] > 0 for p in files["audio"]))
                  for b in (["pyav", "dali"] if have_dali else ["pyav"])]
    group(contenders, len(files["audio"]), counts_frames=False)
    return rows


def print_table(rows: Sequence[tuple]) -> None:
    """Ratios: vs the PyAV row of the same `what`; H.264 rows vs PyAV VP9 (same clips, other codec)."""
    pyav = {(r[0], r[1]): r[5] / r[3] for r in rows if r[2] == "pyav"}  # seconds per clip
    header = f"{'set':<10} {'what':<20} {'backend':<9} {'files':>5} {'frames/s':>10} {'clips/s':>9} {'vs pyav':>8}"
    print(header)
    print("-" * len(header))
    for set_name, what, backend, n, frames, seconds in rows:
        fps = f"{frames / seconds:10.1f}" if frames is not None else f"{'-':>10}"
        base = pyav.get((set_name, what.replace("H.264", "VP9")))
        ratio = f"{base / (seconds / n):7.2f}x" if base else f"{'-':>8}"
        print(f"{set_name:<10} {what:<20} {backend:<9} {n:>5} {fps} {n / seconds:9.1f} {ratio}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="demo data folder (tools/make_demo_data.py --out)")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="time per row (median of passes)")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the generated 360x640 set")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = []
    if args.data:
        files = demo_set(args.data)
        if not any(files.values()):
            print(f"no media under {args.data}/videos or {args.data}/audio", file=sys.stderr)
            return 1
        info = [probe_video(open(p, "rb").read()) for p in files["vp9"][:1] + files["h264"][:1]]
        print(f"demo set: {len(files['vp9'])} VP9 + {len(files['h264'])} H.264 clips "
              f"({', '.join(f'{i.codec} {i.num_frames}x{i.height}x{i.width}' for i in info)}), "
              f"{len(files['audio'])} audio clips")
        rows += bench_set("demo", files, args.min_seconds)
    if not args.no_synthetic or not args.data:
        with tempfile.TemporaryDirectory() as root:
            t0 = time.perf_counter()
            files = synthetic_set(root)
            print(f"synthetic set: 2 VP9 + 2 H.264 clips (48 frames, 360x640, 24 fps), 4 audio clips of 10 s "
                  f"(wav 16k, flac 44.1k, opus 48k, ogg 44.1k); generated in {time.perf_counter() - t0:.1f} s")
            rows += bench_set("synthetic", files, args.min_seconds)
    print("\nsingle-threaded decoders, batch 1, contenders alternated, median of >= 3 passes; "
          "ratio = speed vs the PyAV row of the same set (H.264 rows: vs PyAV VP9)\n")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
