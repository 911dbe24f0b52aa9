"""A TP/PP/DP/VPP run reproduces the single-rank run of the same global batch (fp32, CPU, gloo).

Real torchrun worlds of megatron-core: 1F1B / interleaved schedules, DDP with the
distributed optimizer, vocab-parallel cross entropy.  The reference is the same
config on one rank; layout-invariant init makes the starting weights identical.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.launch import metrics, torchrun, train

STEPS = 5
REL_TOL = 1e-5
# Validation at the last step: forward-only schedule, same held-out batch at every layout.
EVAL = [f"train.eval_interval={STEPS}", "train.eval_iters=1"]
METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "step_time_s", "tokens_per_s", "tflops_per_gpu"}

LAYOUTS = {
    "tp2_pp2": ["parallel.tp=2", "parallel.pp=2"],
    "tp2_dp2": ["parallel.tp=2"],
    "pp2_dp2_vpp2": ["parallel.pp=2", "parallel.vpp=2"],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("ref")
    train(1, out, [f"train.steps={STEPS}", *EVAL], cache_dir=data_cache)
    return metrics(out)


# TP2 x PP2 is compared gradient by gradient below; its 5-step loss run is an extra layout (-m slow).
@pytest.mark.parametrize("layout", [pytest.param("tp2_pp2", marks=pytest.mark.slow), "tp2_dp2", "pp2_dp2_vpp2"])
def test_losses_match_single_rank(layout, reference, tmp_path, data_cache):
    proc = train(4, tmp_path, [f"train.steps={STEPS}", *EVAL, *LAYOUTS[layout]], cache_dir=data_cache)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert METRIC_KEYS <= set(rows[0]), set(rows[0])
    assert rows[-1]["val_loss"] == pytest.approx(reference[-1]["val_loss"], rel=REL_TOL)
    assert any(f.name.startswith("events.out.tfevents") for f in (tmp_path / "tensorboard").iterdir())
    progress = [line for line in proc.stdout.splitlines() if f"step      {STEPS}/{STEPS}" in line]
    assert progress and all(k in progress[0] for k in ("loss:", "lr:", "tokens/s:", "TFLOP/s/GPU:", "ETA")), progress
    for ref, got in zip(reference, rows):
        assert got["tokens"] == ref["tokens"]
        assert got["loss"] == pytest.approx(ref["loss"], rel=REL_TOL), (layout, got["step"])
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=REL_TOL), (layout, got["step"])
    # The model learns: 5 steps at warmup LR already move the loss.
    assert rows[-1]["loss"] < rows[0]["loss"]


def _grads(nproc, path, overrides):
    torchrun(nproc, ["tests/helpers/grad_step.py", str(path), *overrides,
                     "data.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=8"])
    return torch.load(path)


GRAD_COMMON = ["parallel.use_distributed_optimizer=false"]


@pytest.fixture(scope="module")
def grad_reference(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("grad_ref")
    return _grads(1, out / "ref.pt", [f"data.cache_dir={data_cache}", f"train.output_dir={out}", *GRAD_COMMON])


# VPP's losses and grad norms are compared above; its gradient-by-gradient run is an extra layout (-m slow).
@pytest.mark.parametrize("layout", ["tp2_pp2", pytest.param("pp2_dp2_vpp2", marks=pytest.mark.slow)])
def test_gradients_match_single_rank(layout, grad_reference, tmp_path, data_cache):
    ref = grad_reference
    got = _grads(4, tmp_path / "par.pt", [f"data.cache_dir={data_cache}", f"train.output_dir={tmp_path}",
                                          *GRAD_COMMON, *LAYOUTS[layout]])
    assert got["loss"] == pytest.approx(ref["loss"], rel=REL_TOL)
    assert set(got["grads"]) == set(ref["grads"])
    assert len(ref["grads"]) == 4 * 6 + 3  # 6 tensors per layer + embedding, final norm, output layer
    for name, g_ref in ref["grads"].items():
        g = got["grads"][name]
        assert g.shape == g_ref.shape, name
        scale = g_ref.abs().max().item()
        assert scale > 0, f"{name}: zero gradient in the reference"
        assert (g - g_ref).abs().max().item() <= 1e-5 * scale + 1e-9, name
