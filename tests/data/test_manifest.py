"""Manifest validation (errors name file:line) and blend YAML parsing + held-out split."""

from __future__ import annotations

import json

import pytest

from megatron_omni.config.loader import ConfigError
from megatron_omni.data.blend import BlendConfig, BlendSource, load_blend, split_heldout
from megatron_omni.data.manifest import ManifestError, check_media, read_manifest


def _row(i, **kw):
    row = {"id": f"r{i}", "task": "caption", "modality": "image", "media": [f"img/{i}.jpg"],
           "conversations": [{"role": "user", "content": f"<image>img/{i}.jpg</image>\nDescribe."},
                             {"role": "assistant", "content": "A shape."}]}
    row.update(kw)
    return row


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_valid_manifest_reads_rows(tmp_path):
    path = _write(tmp_path / "m.jsonl", [
        _row(0, metadata={"width": 64}),
        {"id": "t", "task": "text", "modality": "text", "text": "Plain document."},
        {"id": "d", "task": "dpo", "modality": "text", "conversations": [{"role": "user", "content": "Hi?"}],
         "chosen": "Hello!", "rejected": "Go away."},
        {"id": "s", "task": "speech_gen", "modality": "audio", "conversations": [
            {"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes.", "audio_codes": [1, 2]}]},
    ])
    rows = read_manifest(path)
    assert [r.id for r in rows] == ["r0", "t", "d", "s"]
    assert rows[0].media == ["img/0.jpg"] and rows[0].metadata == {"width": 64} and rows[0].where == f"{path}:1"
    assert rows[2].chosen == "Hello!" and rows[3].conversations[1].audio_codes == [1, 2]


@pytest.mark.parametrize("bad, message", [
    ("{not json", r"not valid JSON .*write one JSON object per line"),
    (_row(1, task="captions"), r"'task' is 'captions'; use one of caption"),
    (_row(1, modality="img"), r"'modality' is 'img'; use one of"),
    (_row(1, medai=[]), r"unknown key 'medai'; allowed keys"),
    (_row(1, media=[]), r"'media' \[\] must list the referenced media in order.*write each"),
    (_row(1, media=["/abs/1.jpg"], conversations=[{"role": "user", "content": "<image>/abs/1.jpg</image>"},
                                                  {"role": "assistant", "content": "x"}]), r"media path '/abs/1.jpg' must be relative to data.root"),
    (_row(1, text="also text"), r"give exactly one of 'conversations' \(chat\) or 'text'"),
    (_row(1, conversations=[{"role": "user", "content": "<image>img/1.jpg</image>"}]),
     r"the last turn must be the assistant's answer"),
    (_row(1, task="dpo", chosen="a"), r"a dpo row needs 'conversations' ending with the user turn"),
    (_row(1, conversations=[{"role": "user", "content": "<image>img/1.jpg</image>"},
                            {"role": "assistant", "content": "x", "audio_codes": [-1]}]), r"conversations\[1\]: audio_codes must be"),
    (_row(1, id=""), r"'id' must be a non-empty string"),
])
def test_errors_name_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path / "bad.jsonl", [_row(0), bad])
    with pytest.raises(ManifestError, match=rf"bad.jsonl:2: {message}"):
        read_manifest(path)


def test_all_bad_lines_reported_and_duplicates(tmp_path):
    path = _write(tmp_path / "m.jsonl", [_row(0), "[]", _row(0), _row(2, task="x")])
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    text = str(err.value)
    assert text.startswith(f"3 invalid line(s) in {path}")
    assert f"{path}:2: each line must be one JSON object" in text
    assert f"{path}:3: duplicate id 'r0' (first on line 1)" in text
    assert f"{path}:4: 'task' is 'x'" in text
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(str(tmp_path / "none.jsonl"))


def test_missing_media_counted(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "0.jpg").write_bytes(b"x")
    rows = read_manifest(_write(tmp_path / "m.jsonl", [_row(0), _row(1), _row(2)]))
    check = check_media(rows, str(tmp_path))
    assert check.checked == 3 and len(check.missing) == 2 and check.missing_by_kind == {"image": 2}
    assert check.missing[0].endswith("m.jsonl:2: img/1.jpg")
    assert "2 of 3 media files missing (image: 2)" in check.summary()


BLEND_YAML = """
max_image_tokens: 1280
max_video_frames: 16
validation: {image: 5, text: 3}
sources:
  - {name: cap, manifest: manifests/cap.jsonl, modality: image, weight: 2}
  - {name: ocr, manifest: manifests/ocr.jsonl, modality: image}
  - {name: txt, manifest: manifests/txt.jsonl, modality: text, weight: 0.5}
"""


def test_blend_parse_and_heldout_split(tmp_path):
    path = tmp_path / "it2.yaml"
    path.write_text(BLEND_YAML)
    blend = load_blend(str(path))
    assert blend.stage == "it2" and blend.pure_text_share == 0.25 and blend.modalities == ["image", "text"]
    assert blend.sources[0] == BlendSource("cap", "manifests/cap.jsonl", "image", 2.0)
    assert blend.manifest_path(blend.sources[0], "/data") == "/data/manifests/cap.jsonl"

    def rows(prefix, n, modality):
        p = _write(tmp_path / f"{prefix}.jsonl", [
            {"id": f"{prefix}{i}", "task": "text", "modality": modality, "text": f"doc {i}"} for i in range(n)])
        return read_manifest(p)

    by_source = {"cap": rows("cap", 20, "image"), "ocr": rows("ocr", 7, "image"), "txt": rows("txt", 10, "text")}
    split = split_heldout(blend, by_source)
    for name, src_rows in by_source.items():
        train_ids = {r.id for r in split[name].train}
        valid_ids = {r.id for r in split[name].valid}
        assert not train_ids & valid_ids and train_ids | valid_ids == {r.id for r in src_rows}
    assert len(split["cap"].valid) + len(split["ocr"].valid) == 5 and len(split["txt"].valid) == 3
    # Deterministic, independent of file order, and stable when rows are appended.
    reordered = {k: list(reversed(v)) for k, v in by_source.items()}
    again = split_heldout(blend, reordered)
    assert all({r.id for r in again[k].valid} == {r.id for r in split[k].valid} for k in by_source)
    grown = dict(by_source, txt=by_source["txt"] + rows("zz", 1, "text"))
    grown_split = split_heldout(blend, grown)
    assert {r.id for r in grown_split["cap"].valid} == {r.id for r in split["cap"].valid}
    # Another seed holds out another set.
    other = split_heldout(BlendConfig(**{**blend.__dict__, "seed": 99}), by_source)
    assert [r.id for r in other["cap"].valid + other["ocr"].valid] != [r.id for r in split["cap"].valid + split["ocr"].valid]


@pytest.mark.parametrize("yaml_text, message", [
    ("sources: []", "no sources"),
    ("sources: [{name: a, manifest: a.jsonl, modality: pictures}]", "modality 'pictures'"),
    ("sources: [{name: a, manifest: a.jsonl, modality: video}]", "max_video_frames is not set"),
    ("validation: {audio: 2}\nsources: [{name: a, manifest: a.jsonl, modality: image}]", "no source has it"),
    ("sources: [{name: a, manifest: a.jsonl, modality: image, wieght: 2}]", "wieght"),
    ("pure_text_share: 1.5\nsources: [{name: a, manifest: a.jsonl, modality: image}]", "pure_text_share"),
])
def test_blend_errors(tmp_path, yaml_text, message):
    path = tmp_path / "b.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_blend(str(path))
