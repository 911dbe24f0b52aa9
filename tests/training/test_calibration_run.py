"""tools/calibrate_step_balance.py on the omni training loop (Alg. 1 lines 3-8): each modality trained
alone from the same initial weights until its loss plateaus; the written weights are Eq. 6 of the
recorded L*, and the stage config system reads them back."""

import re

import pytest
import yaml

from megatron_omni.balance import SchedulerConfig
from tests.helpers.launch import torchrun


def test_calibration_writes_eq6_weights(tmp_path):
    out = tmp_path / "weights.yaml"
    torchrun(1, ["tools/calibrate_step_balance.py", "--config", "configs/tiny/omni_mock.yaml", "--out", str(out),
                 "balance={mode: accumulation, modalities: [image, audio, text], pure_text_share: null, "
                 "calibration: {window: 3, delta: 0.05, max_steps: 40}}",
                 "train.micro_batch_size=1", "train.global_batch_size=2", "data.seq_length=96",
                 f"train.output_dir={tmp_path}", "optimizer.lr_warmup_steps=1"])
    text = out.read_text()
    losses = {m: float(v) for m, v in re.findall(r"#   (\w+): ([0-9.]+) \(\d+ steps\)", text)}
    assert set(losses) == {"image", "audio", "text"}
    # the file is a balance-section fragment: merged under a stage's own balance settings
    weights = SchedulerConfig(modalities=list(losses), pure_text_share=None,
                              step_weights=yaml.safe_load(text)["step_weights"]).step_weights
    inv = {m: 1.0 / l for m, l in losses.items()}
    for m in losses:  # Eq. 6 with alpha = 10 (the printed L* carry 6 decimals)
        assert weights[m] == pytest.approx(10.0 * inv[m] / sum(inv.values()), rel=1e-5)
