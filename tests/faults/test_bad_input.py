"""Bad input is one clear error naming the file and the fix (the rest of issue 16's list is in
tests/data/test_manifest.py, tests/config/ and test_guards.py)."""

from __future__ import annotations

import pytest

from megatron_omni.data.blend import load_blend, read_blend_manifests
from megatron_omni.data.manifest import ManifestError


def test_an_empty_manifest_is_refused_naming_the_file(tmp_path):
    blend = tmp_path / "b.yaml"
    blend.write_text("sources: [{name: cap, manifest: m/cap.jsonl, modality: image}, "
                     "{name: txt, manifest: m/txt.jsonl, modality: text}]")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "cap.jsonl").write_text('{"id": "a", "task": "text", "modality": "image", "text": "x"}\n')
    (tmp_path / "m" / "txt.jsonl").write_text("\n")  # empty but for a blank line
    with pytest.raises(ManifestError) as err:
        read_blend_manifests(load_blend(str(blend)), str(tmp_path))
    assert str(err.value) == (f"{tmp_path / 'm' / 'txt.jsonl'}: the manifest has no samples; write one JSON object "
                              "per line, or remove its source from the blend")
