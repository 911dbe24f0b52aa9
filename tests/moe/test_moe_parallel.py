"""Expert parallelism reproduces the single-rank MoE run (fp32, CPU, gloo, real torchrun worlds).

EP=2 (2 ranks: the 4 routed experts split 2 + 2, all-to-all token dispatch) and TP2 x EP2 with
sequence parallelism (4 ranks: experts also TP-split, tokens all-gathered over expert-TP) train
the tiny MoE config (shared + routed + null experts, aux loss on) for a few steps; every step's
loss, gradient norm and routing statistics must equal the one-rank run's.
"""

from __future__ import annotations

import math

import pytest

from tests.helpers.launch import metrics, train

CONFIG = "configs/tiny/moe_llm.yaml"
STEPS = 3
REL_TOL = 1e-5
LAYOUTS = {
    "ep2": (2, ["parallel.ep=2"]),
    "tp2_ep2_sp": (4, ["parallel.tp=2", "parallel.ep=2", "parallel.sequence_parallel=true"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("moe_ref")
    train(1, out, [f"train.steps={STEPS}"], cache_dir=data_cache, config=CONFIG)
    return metrics(out)


def _fractions(row):
    return {(m, layer, k): v for m, entry in row["moe"].items() for layer, stats in entry["layers"].items()
            for k, v in stats.items() if k != "tokens"}


# EP2 alone is an extra layout (-m slow): TP2 x EP2 + SP covers the expert all-to-all with TP on top.
@pytest.mark.parametrize("layout", [pytest.param("ep2", marks=pytest.mark.slow), "tp2_ep2_sp"])
def test_expert_parallel_matches_single_rank(layout, reference, tmp_path, data_cache):
    nproc, overrides = LAYOUTS[layout]
    train(nproc, tmp_path, [f"train.steps={STEPS}", *overrides], cache_dir=data_cache, config=CONFIG)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for ref, got in zip(reference, rows):
        assert got["loss"] == pytest.approx(ref["loss"], rel=REL_TOL), (layout, got["step"])
        # The gradient norm includes the router's load-balancing-loss gradient.
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=REL_TOL), (layout, got["step"])
        ref_f, got_f = _fractions(ref), _fractions(got)
        assert ref_f.keys() == got_f.keys()
        for key, value in ref_f.items():
            assert got_f[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (layout, key)
    layer = rows[-1]["moe"]["all"]["layers"]["00"]
    assert math.isclose(sum(v for k, v in layer.items() if k.startswith(("e", "null")) and k != "null_rate"), 1.0)
    assert 0.0 < layer["null_rate"] < 1.0 and layer["load_balancing_loss"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"]
