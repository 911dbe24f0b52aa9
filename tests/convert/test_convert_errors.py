"""Corrupted or mismatched input is refused with one message listing every problem, and nothing is written.

These run the library in-process: every check here happens before a process group or a
megatron model exists (a conversion that passes them runs in a subprocess elsewhere)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_omni.convert import ConversionError, hf_to_mcore
from megatron_omni.convert.common import _atomic_output
from tests.convert.convert_helpers import make_hf_llama
from tests.helpers.launch import REPO


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(folder: Path, edit) -> None:
    """Apply edit(dict of all tensors) and re-save the folder's shards + index (same file names)."""
    from safetensors.torch import load_file, save_file

    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = sorted(set(index["weight_map"].values()))
    per_file = {f: load_file(folder / f) for f in files}
    everything = {k: v for d in per_file.values() for k, v in d.items()}
    owner = {k: f for f, d in per_file.items() for k in d}
    edit(everything)
    out = {f: {} for f in files}
    for k, v in everything.items():
        out[owner.get(k, files[0])][k] = v.contiguous()
    for f, tensors in out.items():
        save_file(tensors, folder / f, metadata={"format": "pt"})
    index["weight_map"] = {k: f for f, d in out.items() for k in d}
    index_path.write_text(json.dumps(index))


def _refused(hf_dir: Path, out: Path, **kw) -> ConversionError:
    with pytest.raises(ConversionError) as e:
        hf_to_mcore(str(hf_dir), str(out), **kw)
    assert not out.exists(), "a refused conversion must not create its output"
    assert not list(out.parent.glob(f".{out.name}.partial-*"))
    assert "nothing was written" in str(e.value)
    return e.value


def test_missing_extra_and_misshaped_tensors_are_all_listed(hf_models, tmp_path):
    bad = _copy(hf_models["gqa"]["dir"], tmp_path / "bad")

    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
        t["model.layers.2.self_attn.k_proj.weight"] = t["model.layers.2.self_attn.k_proj.weight"][:16]
    _edit_tensors(bad, edit)
    err = _refused(bad, tmp_path / "out")
    msg = str(err)
    assert "model.layers.1.mlp.up_proj.weight" in "\n".join(err.problems["target tensors not written"])
    assert "model.layers.0.self_attn.q_norm.weight" in "\n".join(err.problems["source tensors not consumed"])
    assert any("model.layers.2.self_attn.k_proj.weight: file has [16, 64], config.json implies [32, 64]" in m
               for m in err.problems["shape mismatches"]), msg


def test_truncated_safetensors_file(hf_models, tmp_path):
    bad = _copy(hf_models["gqa"]["dir"], tmp_path / "bad")
    shard = sorted(bad.glob("*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    err = _refused(bad, tmp_path / "out")
    (entry,) = err.problems["unreadable files"]
    assert shard.name in entry and "truncated" in entry


def test_index_naming_a_missing_file(hf_models, tmp_path):
    bad = _copy(hf_models["gqa"]["dir"], tmp_path / "bad")
    victim = sorted(bad.glob("*.safetensors"))[0]
    victim.unlink()
    err = _refused(bad, tmp_path / "out")
    assert any(victim.name in e and "missing" in e for e in err.problems["unreadable files"])


def test_unsupported_config_values_are_all_listed(hf_models, tmp_path):
    bad = _copy(hf_models["gqa"]["dir"], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(attention_bias=True, mlp_bias=True, hidden_act="gelu")
    cfg["rope_parameters"]["original_max_position_embeddings"] = 4096
    (bad / "config.json").write_text(json.dumps(cfg))
    problems = _refused(bad, tmp_path / "out").problems["unsupported config"]
    text = "\n".join(problems)
    for needle in ("attention_bias", "mlp_bias", "hidden_act", "original_max_position_embeddings=4096"):
        assert needle in text, text
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    cfg.update(attention_bias=False, mlp_bias=False, hidden_act="silu")
    (bad / "config.json").write_text(json.dumps(cfg))
    (problem,) = _refused(bad, tmp_path / "out").problems["unsupported config"]
    assert "'yarn'" in problem


def test_legacy_rope_scaling_spelling_is_read_too(hf_models, tmp_path):
    """transformers 4.x configs say rope_theta + rope_scaling; an unsupported one there is refused the same way."""
    bad = _copy(hf_models["gqa"]["dir"], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg.update(rope_theta=500000.0, rope_scaling={"type": "dynamic", "factor": 2.0})
    (bad / "config.json").write_text(json.dumps(cfg))
    assert "'dynamic'" in "\n".join(_refused(bad, tmp_path / "out").problems["unsupported config"])


def test_tied_model_with_a_different_lm_head_is_refused(hf_models, tmp_path):
    bad = _copy(hf_models["mha_tied"]["dir"], tmp_path / "bad")
    _edit_tensors(bad, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"] + 1))
    err = _refused(bad, tmp_path / "out")
    assert "lm_head.weight differs from model.embed_tokens.weight" in "\n".join(err.problems["source tensors not consumed"])


def test_layout_the_model_cannot_split_into(hf_models, tmp_path):
    err = _refused(hf_models["gqa"]["dir"], tmp_path / "out", tp=4, pp=3)
    text = "\n".join(err.problems["invalid layout"])
    assert "num_query_groups" in text and "num_layers=4 is not divisible by pp*vpp=3" in text


def test_existing_output_is_not_overwritten(hf_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        hf_to_mcore(str(hf_models["gqa"]["dir"]), str(out))
    assert (out / "keep.txt").read_text() == "x"


def test_failure_while_writing_leaves_no_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with _atomic_output(str(out), overwrite=False) as tmp:
            (Path(tmp) / "half.distcp").write_text("partial")
            raise RuntimeError("disk full")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_exit_status_and_message(hf_models, tmp_path):
    bad = _copy(hf_models["gqa"]["dir"], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["attention_bias"] = True
    (bad / "config.json").write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "hf-to-mcore", "--hf-dir",
                           str(bad), "--out", str(tmp_path / "out"), "--tp", "2", "--pp", "1"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "attention_bias=true" in proc.stderr and "nothing was written" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_not_a_llama(tmp_path):
    path = make_hf_llama(tmp_path / "m", num_attention_heads=4, num_key_value_heads=4, vocab_size=64,
                         num_hidden_layers=1)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (path / "config.json").write_text(json.dumps(cfg))
    err = _refused(path, tmp_path / "out")
    assert "MistralForCausalLM" in err.problems["unsupported config"][0]


def test_failure_mid_write_raises_the_cause_and_leaves_nothing(hf_models, tmp_path):
    """A read error after the checks passed (here: injected while layer 2 is written) surfaces as
    itself, and neither the output nor the temporary folder remains."""
    code = f"""
import megatron_omni.convert.hf_folder as h
from megatron_omni.convert import hf_to_mcore
for name in ("read", "read_into"):
    def broken(self, tensor, *a, _orig=getattr(h.HFFolder, name)):
        if ".layers.2." in tensor:
            raise OSError("injected read error on " + tensor)
        return _orig(self, tensor, *a)
    setattr(h.HFFolder, name, broken)
try:
    hf_to_mcore({str(hf_models["gqa"]["dir"])!r}, {str(tmp_path / "out")!r}, tp=1, pp=1)
except OSError as e:
    print("RAISED", e)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "RAISED injected read error on model.layers.2." in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []
