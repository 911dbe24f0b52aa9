"""Tiny random HF Llama models (made with transformers, fp32, no download) and conversion helpers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Sequence

import numpy as np

from tests.helpers.launch import REPO, torchrun

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# Three GQA ratios, odd vocabularies that need padding, tied and untied embeddings, both RoPE kinds.
SPECS: Dict[str, dict] = {
    # heads/groups 4/2, untied, llama3 RoPE scaling; vocab 2101 pads to 2304 at TP2, 2176 at TP1.
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=2101, tie_word_embeddings=False,
                rope_parameters=LLAMA3_ROPE),
    # heads/groups 4/4 (MHA), tied embeddings (Llama-3.2 style), plain RoPE theta 10000, vocab 1001.
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, vocab_size=1001, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # heads/groups 4/1 (MQA), head_dim 32 != hidden/heads, untied, llama3 RoPE.
    # Saved as one model.safetensors (no index).
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32, vocab_size=1999,
                tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE, max_shard_size="50MB"),
}


def make_hf_llama(path: Path, seed: int = 0, **overrides) -> Path:
    """Save a random fp32 LlamaForCausalLM (4 layers, hidden 64) in several safetensors shards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, max_position_embeddings=131072,
              rms_norm_eps=1e-5, initializer_range=0.08, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    shard_size = kw.pop("max_shard_size", "300KB")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).float()
    with torch.no_grad():  # norms away from 1 so that a misplaced norm weight shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
    model.save_pretrained(path, max_shard_size=shard_size)
    return path


def hf_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


def convert(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """tools/convert_checkpoint.py in a fresh process (megatron's CUDA emulation is process-wide)."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"convert {args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def report(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout)


def forward(load: Path, ids_path: Path, out: Path, tp: int, pp: int, extra: Sequence[str] = ()) -> np.ndarray:
    torchrun(tp * pp, [str(REPO / "tools" / "forward.py"), "--load", str(load), "--input-ids", str(ids_path),
                       "--output", str(out), f"parallel.tp={tp}", f"parallel.pp={pp}", *extra])
    return np.load(out)


def convert_many(calls: Sequence[tuple]) -> list:
    """Several library conversions [(function name, kwargs), ...] in one fresh process (saves the
    per-process import and world start-up of the CLI); returns their reports."""
    import os

    code = ("import json, sys\nimport megatron_omni.convert as c\n"
            "calls = json.loads(sys.argv[1])\n"
            "print(json.dumps([getattr(c, f)(**kw) for f, kw in calls]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([list(c) for c in calls])], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"conversions failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
