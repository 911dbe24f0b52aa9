"""HF parts -> omni checkpoint (omni-from-hf, TP2 x PP2) -> HF folder (mcore-to-hf): every exported tensor is
its source's bit for bit (the Llama's, the Qwen2-VL vision tower's, the Whisper encoder's) where the import
copied it, and the checkpoint's where the import initialised it (new vocabulary rows, audio connector)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.convert.convert_helpers import SPECS, make_hf_llama
from tests.convert.omni_helpers import folder_tensors, make_hf_qwen2vl, make_hf_whisper

pytest.importorskip("transformers")
CODEBOOK = 64
TEXT_VOCAB = SPECS["gqa"]["vocab_size"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from megatron_omni.convert import mcore_to_hf
    from megatron_omni.convert.omni_import import omni_from_hf

    root = tmp_path_factory.mktemp("omni_chain")
    parts = {"llm": make_hf_llama(root / "llm", seed=0, **SPECS["gqa"]),
             "vision": make_hf_qwen2vl(root / "qwen2vl"), "audio": make_hf_whisper(root / "whisper")}
    omni_from_hf(str(parts["llm"]), str(root / "omni"), vision_dir=str(parts["vision"]),
                 audio_dir=str(parts["audio"]), tp=2, pp=2, audio_codebook_size=CODEBOOK)
    report = mcore_to_hf(str(root / "omni"), str(root / "hf"))
    return {"root": root, "parts": parts, "report": report}


def _strip(tensors, prefixes):
    out = {}
    for name, t in tensors.items():
        for p in prefixes:
            if name.startswith(p):
                out[name[len(p):]] = t
    return out


def test_exported_tensors_are_the_sources_bit_for_bit(chain):
    from megatron_omni.convert.mcore_io import CheckpointReader

    root, parts = chain["root"], chain["parts"]
    got = folder_tensors(root / "hf")
    llm = folder_tensors(parts["llm"])
    for name, t in llm.items():
        g = got[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):  # text rows first, then the omni rows
            assert g.shape[0] == TEXT_VOCAB + 17 + CODEBOOK
            g = g[:TEXT_VOCAB]
        assert torch.equal(g, t), name
    vision = _strip(folder_tensors(parts["vision"]), ("model.visual.", "visual."))
    audio = _strip(folder_tensors(parts["audio"]), ("encoder.",))
    exported = {"vision": _strip(got, ("visual.",)), "audio": _strip(got, ("audio_tower.",))}
    assert set(exported["vision"]) == set(vision)
    assert set(exported["audio"]) == set(audio) - {f"layers.{i}.self_attn.k_proj.bias" for i in range(2)}
    for kind, src in (("vision", vision), ("audio", audio)):
        for name, t in exported[kind].items():
            assert torch.equal(t, src[name]), f"{kind} {name}"
    # what the import initialised is exported as the checkpoint holds it
    init = json.loads((root / "omni" / "conversion_report.json").read_text())["initialised"]
    initialised = set(init) if isinstance(init, dict) else {e["name"] if isinstance(e, dict) else e for e in init}
    assert any(n.startswith("audio.connector.") for n in initialised)
    reader = CheckpointReader(str(root / "omni"))
    for key in sorted(k for k in reader.model_keys() if k.startswith("audio.connector.")):
        name = "audio_connector." + key[len("audio.connector."):]
        assert torch.equal(got[name], reader.read({"t": (key, None)})["t"]), name
    emb = reader.read({"t": ("embedding.word_embeddings.weight", None)})["t"]
    assert torch.equal(got["model.embed_tokens.weight"], emb[: TEXT_VOCAB + 17 + CODEBOOK])
    assert set(got) == set(llm) | {"visual." + n for n in vision} | {"audio_tower." + n for n in exported["audio"]} \
        | {"audio_connector." + k[len("audio.connector."):] for k in reader.model_keys()
           if k.startswith("audio.connector.")}


def test_exported_folder_runs_the_sources_encoders(chain):
    """The folder's vision tower is the source Qwen2-VL tower (same outputs), its LLM the source Llama on text."""
    import transformers

    root, parts = chain["root"], chain["parts"]
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", trust_remote_code=True,
                                                              dtype=torch.float32).eval()
    qwen = transformers.Qwen2VLForConditionalGeneration.from_pretrained(parts["vision"], dtype=torch.float32).eval()
    llama = transformers.LlamaForCausalLM.from_pretrained(parts["llm"], dtype=torch.float32).eval()
    grid = torch.tensor([[1, 4, 4], [2, 2, 4]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, TEXT_VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model.encode_visual(pixels, grid), qwen.model.visual(pixels, grid_thw=grid)
        text, text_ref = model(ids).logits[..., :TEXT_VOCAB], llama(ids).logits
    assert torch.equal(ours, getattr(ref, "pooler_output", ref))
    assert (text - text_ref).abs().max() <= 1e-4


@pytest.mark.parametrize("change, match", [
    ({"vision": {"depth": 3}}, "3 layers|has 2 layers|the config has 3"),
    ({"vision": {"norm_epsilon": 1e-5}}, "LayerNorm eps 1e-6"),
    ({"audio": {"conv2_stride": 3}}, "kernel 3, stride 2"),
])
def test_a_checkpoint_the_folder_cannot_express_is_refused_and_nothing_is_written(chain, tmp_path, change, match):
    import shutil

    import yaml

    from megatron_omni.convert import ConversionError, mcore_to_hf

    ckpt = tmp_path / "omni"
    shutil.copytree(chain["root"] / "omni", ckpt)
    bundle = yaml.safe_load((ckpt / "model.yaml").read_text())
    for section, values in change.items():
        bundle["omni"][section].update(values)
    (ckpt / "model.yaml").write_text(yaml.safe_dump(bundle))
    with pytest.raises(ConversionError, match=match) as err:
        mcore_to_hf(str(ckpt), str(tmp_path / "hf"))
    assert "nothing was written" in str(err.value)
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))


def test_parts_to_omni_to_hf_to_omni_is_bit_identical(chain, tmp_path):
    from megatron_omni.convert import hf_to_mcore
    from megatron_omni.convert.mcore_io import CheckpointReader
    from megatron_omni.convert.omni_import import find_omni_config

    back = tmp_path / "omni_again"
    hf_to_mcore(str(chain["root"] / "hf"), str(back), tp=2, pp=2)
    first, again = CheckpointReader(str(chain["root"] / "omni")), CheckpointReader(str(back))
    assert set(again.model_keys()) == set(first.model_keys())
    for key in first.model_keys():
        a, b = first.read({"t": (key, None)})["t"], again.read({"t": (key, None)})["t"]
        assert a.dtype == b.dtype and torch.equal(a, b), key
    assert find_omni_config(str(back)) == find_omni_config(str(chain["root"] / "omni"))
