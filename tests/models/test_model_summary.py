"""`python -m megatron_omni.models.summary`: the 9B / 72B omni configs build (meta device) and match
the paper's Table 1 parameter counts (8.8B, 71.8B) within 2%."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("config,paper", [("m2omni_9b", 8.8e9), ("m2omni_72b", 71.8e9)])
def test_omni_param_counts_match_table1(config, paper):
    proc = subprocess.run([sys.executable, "-m", "megatron_omni.models.summary", "--config",
                           f"configs/model/{config}.yaml"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    total = int(lines[-1].split("total_params:")[1])
    table = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in lines[1:-2]}
    assert sum(table.values()) == total
    assert {"vision_encoder", "vision_connector", "audio_encoder", "audio_connector", "llm.decoder_layers"} <= set(table)
    assert abs(total / paper - 1) < 0.02, (config, total)
    assert 0.6e9 < table["vision_encoder"] + table["vision_connector"] < 0.7e9  # ViT-600M
