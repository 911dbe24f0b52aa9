"""Missing, empty, corrupt and truncated media raise MediaError naming the path, for every backend."""

from __future__ import annotations

import pickle

import pytest

from megatron_omni.data.media import MediaError, load_audio, load_image, load_video, synth
from megatron_omni.config.encoders import AudioConfig, VisionConfig

VISION, AUDIO = VisionConfig(), AudioConfig()
BACKENDS = {"image": ("dali", "pil"), "video": ("dali", "pyav"), "audio": ("dali", "pyav")}


def _load(kind, path, backend):
    if kind == "image":
        return load_image(str(path), vision=VISION, max_tokens=64, backend=backend)
    if kind == "video":
        return load_video(str(path), vision=VISION, max_frames=8, max_tokens=256, backend=backend)
    return load_audio(str(path), audio=AUDIO, backend=backend)


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    files = {}
    for name in ("a.jpg", "a.png"):
        files[name] = root / name
        synth.write_image(files[name], synth.smooth_rgb(96, 128))
    clip = synth.smooth_clip(12, 64, 96)
    for name, codec in (("a.webm", "vp9"), ("a.mp4", "h264")):
        files[name] = root / name
        synth.write_video(files[name], clip, fps=6.0, codec=codec)
    wave = synth.chirp(1.0, 16000)
    for name in ("a.wav", "a.flac", "a.opus", "a.ogg"):
        files[name] = root / name
        synth.write_audio(files[name], wave, 16000)
    return files


def _kind(name):
    return {"jpg": "image", "png": "image", "webm": "video", "mp4": "video"}.get(name.rsplit(".", 1)[1], "audio")


def _backends(kind):
    dali = pytest.importorskip("megatron_omni.data.dali")
    return [b for b in BACKENDS[kind] if b != "dali" or dali.available()]


NAMES = ["a.jpg", "a.png", "a.webm", "a.mp4", "a.wav", "a.flac", "a.opus", "a.ogg"]


@pytest.mark.parametrize("name", NAMES)
def test_good_files_load(good_files, name):
    for backend in _backends(_kind(name)):
        if name == "a.mp4" and backend == "dali":
            continue  # H.264 is not a DALI CPU codec (covered below)
        _load(_kind(name), good_files[name], backend)


@pytest.mark.parametrize("damage", ["missing", "empty", "garbage", "truncated"])
@pytest.mark.parametrize("name", NAMES)
def test_bad_files_raise_media_error(tmp_path, good_files, name, damage):
    kind = _kind(name)
    path = tmp_path / f"bad_{damage}_{name}"
    data = good_files[name].read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) * 3 // 5])
    for backend in _backends(kind):
        with pytest.raises(MediaError) as info:
            _load(kind, path, backend)
        assert str(path) in str(info.value) and info.value.path == str(path)
        assert info.value.reason


def test_forced_dali_on_an_unsupported_codec_is_a_media_error(good_files):
    dali = pytest.importorskip("megatron_omni.data.dali")
    if not dali.available() or dali.device() == "gpu":
        pytest.skip("needs DALI on a CPU machine")
    with pytest.raises(MediaError, match="h264"):
        _load("video", good_files["a.mp4"], "dali")


def test_media_error_pickles_for_dataloader_workers():
    err = pickle.loads(pickle.dumps(MediaError("/data/x.jpg", "file not found")))
    assert isinstance(err, MediaError) and err.path == "/data/x.jpg" and str(err) == "/data/x.jpg: file not found"


def test_unknown_backend_is_a_config_error(good_files):
    with pytest.raises(ValueError, match="MEGATRON_OMNI_IMAGE_BACKEND"):
        load_image(str(good_files["a.jpg"]), vision=VISION, max_tokens=64, backend="ffmpeg")


def test_audio_longer_than_the_encoder_is_a_media_error(good_files):
    short_encoder = AudioConfig(max_source_positions=40)  # whisper-style: 80 fbank frames = 0.8 s
    with pytest.raises(MediaError, match="too long"):
        load_audio(str(good_files["a.wav"]), audio=short_encoder)


def test_gif_goes_through_pil(tmp_path):
    from PIL import Image

    path = tmp_path / "a.gif"
    Image.fromarray(synth.smooth_rgb(60, 80)).save(path)
    out = load_image(str(path), vision=VISION, max_tokens=64)  # automatic: DALI cannot read GIF
    assert out.grid_thw.tolist() == [[1, 4, 6]]
    dali = pytest.importorskip("megatron_omni.data.dali")
    if dali.available():
        with pytest.raises(MediaError, match="GIF"):
            load_image(str(path), vision=VISION, max_tokens=64, backend="dali")


@pytest.mark.parametrize("name", NAMES)
def test_random_byte_corruption_never_escapes_as_another_error(tmp_path, good_files, name):
    """Flipped bytes either still decode or raise MediaError; nothing else escapes (seeded; an ad-hoc
    run with 60 mutations per file found the unknown-codec case this guards)."""
    import random

    kind = _kind(name)
    data = good_files[name].read_bytes()
    rng = random.Random(name)
    for trial in range(6):
        damaged = bytearray(data)
        for _ in range(rng.choice([1, 5, 50])):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        path = tmp_path / f"fuzz{trial}_{name}"
        path.write_bytes(bytes(damaged))
        for backend in _backends(kind):
            if name == "a.mp4" and backend == "dali":
                continue
            try:
                _load(kind, path, backend)
            except MediaError as e:
                assert e.path == str(path)
