"""NaViT vision encoder (megatron-core) vs transformers' Qwen2-VL vision tower, same random weights.

Also: packed forward == per-image forwards, position ids / segments == HF's helpers, QKV layout
round trip, parameter count of the 600M config (built on the meta device), and TP2 == reference
(2-rank torchrun; this file is the worker script, see ``__main__``)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from megatron_omni.models.vision import (
    NaViTEncoder,
    VisionConfig,
    block_diagonal_mask,
    hf_to_megatron,
    load_hf_state_dict,
    megatron_to_hf,
    merged_token_counts,
    vision_cu_seqlens,
    vision_position_ids,
)

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/model/vision_tiny.yaml"
BIG = REPO / "configs/model/vision_600m.yaml"
# two images of different sizes and a 4-frame video (t=2 after temporal patching)
GRID = torch.tensor([[1, 4, 6], [1, 6, 8], [2, 4, 4]])
TOL = 1e-5


def _hf_model(cfg: VisionConfig, seed: int = 0):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    hcfg = Qwen2VLVisionConfig(
        depth=cfg.depth, embed_dim=cfg.hidden_size, hidden_size=cfg.out_hidden_size,
        num_heads=cfg.num_attention_heads, mlp_ratio=cfg.ffn_hidden_size // cfg.hidden_size,
        hidden_act=cfg.activation, patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size,
        in_channels=cfg.in_channels, spatial_merge_size=cfg.spatial_merge_size)
    hcfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2VisionTransformerPretrainedModel(hcfg).float().eval()
    with torch.no_grad():  # non-trivial biases / LayerNorm affine too
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.05)
            elif "norm" in name or "ln_q" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model


def _inputs(cfg: VisionConfig, grid: torch.Tensor, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), cfg.patch_dim, generator=g)


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
    from megatron_omni.convert.mcore_io import megatron_world

    cfg = VisionConfig.from_yaml(str(TINY))
    hf = _hf_model(cfg)
    with megatron_world():
        enc = NaViTEncoder(cfg).eval()
        load_hf_state_dict(enc, hf.state_dict())
        yield cfg, hf, enc


def test_matches_hf_qwen2vl_vision_tower(tiny):
    cfg, hf, enc = tiny
    pv = _inputs(cfg, GRID)
    with torch.no_grad():
        ref = hf(pv, grid_thw=GRID)
        out, hidden = enc(pv, GRID, return_hidden=True)
    n_out = int(merged_token_counts(GRID, cfg.spatial_merge_size).sum())
    assert out.shape == ref.pooler_output.shape == (n_out, cfg.out_hidden_size)
    d_out = (out - ref.pooler_output).abs().max().item()
    d_hid = (hidden - ref.last_hidden_state).abs().max().item()
    print(f"\nmax|delta| vs HF: merged output {d_out:.3e} (scale {ref.pooler_output.abs().max():.2f}), "
          f"ViT hidden {d_hid:.3e}")
    assert d_out <= TOL and d_hid <= TOL


def test_packed_equals_per_image(tiny):
    cfg, _, enc = tiny
    pv = _inputs(cfg, GRID, seed=2)
    with torch.no_grad():
        packed = enc(pv, GRID)
        pieces, outs = pv.split(GRID.prod(-1).tolist()), []
        for g, x in zip(GRID, pieces):
            outs.append(enc(x, g.view(1, 3)))
    d = (packed - torch.cat(outs)).abs().max().item()
    print(f"\npacked vs per-image max|delta| {d:.3e}")
    assert d <= TOL


def test_gradients_flow(tiny):
    cfg, _, enc = tiny
    pv = _inputs(cfg, GRID, seed=3)
    enc.zero_grad()
    enc(pv, GRID).square().mean().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    enc.zero_grad()


def test_recompute_gives_the_same_gradients_and_keeps_fewer_activations(tiny):
    """`recompute: true` (megatron full recompute per block) changes memory, not math."""
    import dataclasses

    from megatron_omni.convert.mcore_io import megatron_world

    cfg, hf, _ = tiny
    pv = _inputs(cfg, GRID, seed=4)
    grads, saved = {}, {}
    for recompute in (False, True):
        with megatron_world():
            enc = NaViTEncoder(dataclasses.replace(cfg, recompute=recompute)).train()
            load_hf_state_dict(enc, hf.state_dict())
            kept = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
                loss = enc(pv, GRID).square().mean()
            loss.backward()
            grads[recompute] = {n: p.grad.clone() for n, p in enc.named_parameters()}
            saved[recompute] = sum(kept)
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=0, atol=1e-6, msg=name)
    print(f"\nsaved activation elements: {saved[False]} without recompute, {saved[True]} with")
    assert saved[True] < 0.6 * saved[False]


def test_positions_and_segments_match_hf():
    vu = pytest.importorskip("transformers.vision_utils")
    grids = torch.tensor([[1, 4, 6], [3, 6, 8], [2, 2, 2], [1, 10, 4]])
    assert torch.equal(vision_position_ids(grids, 2), vu.get_vision_position_ids(grids, 2).long())
    assert torch.equal(vision_cu_seqlens(grids), vu.get_vision_cu_seqlens(grids))
    mask = block_diagonal_mask(torch.tensor([0, 2, 5], dtype=torch.int32))[0, 0]
    expect = torch.ones(5, 5, dtype=torch.bool)
    expect[:2, :2] = False
    expect[2:, 2:] = False
    assert torch.equal(mask, expect)


def test_qkv_layout_round_trip():
    cfg = VisionConfig.from_yaml(str(TINY))
    hf = {"blocks.0.attn.qkv.weight": torch.arange(3 * 64 * 64.0).view(192, 64),
          "blocks.0.attn.qkv.bias": torch.arange(192.0)}
    mc = hf_to_megatron(hf, cfg)
    w = mc["decoder.layers.0.self_attention.linear_qkv.weight"]
    d = cfg.head_dim
    # megatron row block of head 1: [q_1; k_1; v_1]
    assert torch.equal(w[3 * d:4 * d], hf["blocks.0.attn.qkv.weight"][d:2 * d])  # q_1
    assert torch.equal(w[4 * d:5 * d], hf["blocks.0.attn.qkv.weight"][64 + d:64 + 2 * d])  # k_1
    back = megatron_to_hf(mc, cfg)
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_param_counts():
    from megatron_omni.convert.mcore_io import MetaDevice, megatron_world

    tiny_cfg = VisionConfig.from_yaml(str(TINY))
    big = VisionConfig.from_yaml(str(BIG))
    with megatron_world():
        n_tiny = sum(p.numel() for p in NaViTEncoder(tiny_cfg).parameters())
        with MetaDevice():
            enc = NaViTEncoder(big)
        n_big = sum(p.numel() for p in enc.parameters())
    assert n_tiny == tiny_cfg.num_parameters()
    if pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl"):
        assert n_tiny == sum(p.numel() for p in _hf_model(tiny_cfg).parameters())
    print(f"\nvision_600m params: {n_big:,} ({n_big / 1e9:.3f}B, out_hidden_size {big.out_hidden_size})")
    assert n_big == big.num_parameters()
    assert 0.6e9 <= n_big <= 0.7e9


def test_tp2_matches_hf(tmp_path):
    pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
    from tests.helpers.launch import torchrun

    out = tmp_path / "tp2.json"
    torchrun(2, [str(Path(__file__)), str(out)], timeout=300)
    res = json.loads(out.read_text())
    print(f"\nTP2 max|delta| vs HF: output {res['out']:.3e}, hidden {res['hidden']:.3e}")
    assert res["tp"] == 2 and res["out"] <= TOL and res["hidden"] <= TOL


def _tp2_worker(out_path: str) -> None:
    import torch.distributed as dist

    from megatron_omni.config.schema import ParallelConfig
    from megatron_omni.parallel.initialize import destroy_distributed, initialize_distributed, set_random_seeds
    from megatron.core import parallel_state

    initialize_distributed(ParallelConfig(tp=2, backend="gloo"))
    set_random_seeds(0)
    try:
        cfg = VisionConfig.from_yaml(str(TINY))
        hf = _hf_model(cfg)
        enc = NaViTEncoder(cfg).eval()
        assert parallel_state.get_tensor_model_parallel_world_size() == 2
        load_hf_state_dict(enc, hf.state_dict())
        pv = _inputs(cfg, GRID)
        with torch.no_grad():
            ref = hf(pv, grid_thw=GRID)
            o, h = enc(pv, GRID, return_hidden=True)
        d = torch.tensor([(o - ref.pooler_output).abs().max().item(), (h - ref.last_hidden_state).abs().max().item()])
        dist.all_reduce(d, op=dist.ReduceOp.MAX)
        if dist.get_rank() == 0:
            Path(out_path).write_text(json.dumps({"tp": 2, "out": d[0].item(), "hidden": d[1].item()}))
    finally:
        destroy_distributed()


if __name__ == "__main__":
    _tp2_worker(sys.argv[1])
