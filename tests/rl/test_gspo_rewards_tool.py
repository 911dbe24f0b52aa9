"""tools/gspo_rewards.py: one line per rollout batch (its mini-batch steps merged), the first / last
window's rollout-weighted mean reward, and a clear error on a metrics file without GSPO rows."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("gspo_rewards", REPO / "tools" / "gspo_rewards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(step, batch, reward, rollouts=8):
    return {"step": step, "rollout_batch": batch, "reward_mean": reward, "reward_std": 0.1, "rollouts": rollouts,
            "reward_mean_by_modality": {"video": reward}, "response_length_mean": 5.0, "clip_fraction": 0.25}


def test_reward_curve_per_rollout_batch(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    rows = [_row(1, 0, 0.0), _row(2, 0, 0.0), _row(3, 1, 0.5, rollouts=24), _row(4, 1, 0.5, rollouts=24),
            _row(5, 2, 1.0), _row(6, 2, 1.0), _row(7, 3, 0.75), _row(8, 3, 0.75)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tool = _tool()
    assert [b["steps"] for b in tool.rollout_batches(str(path))] == [[1, 2], [3, 4], [5, 6], [7, 8]]
    tool.main([str(path), "--window", "2"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6 and out[2].split()[:3] == ["1", "3-4", "0.500"]
    # rollout-weighted: (0 x 8 + 0.5 x 24) / 32 and (1 x 8 + 0.75 x 8) / 16
    assert out[-1] == "mean reward: first 2 rollout batches 0.3750, last 2 0.8750 (+0.5000)"
    tool.main([str(path), "--window", "9"])  # at most half the batches at each end
    assert capsys.readouterr().out.splitlines()[-1].startswith("mean reward: first 2 rollout batches")


def test_not_a_gspo_metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    with pytest.raises(SystemExit, match="no GSPO rows"):
        _tool().main([str(path)])
