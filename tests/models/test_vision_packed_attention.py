"""The ViT's packed attention runs the LLM's backends (`model.packed_attention`): the THD `torch` path
(PackedCoreAttention, per-segment SDPA on CPU, non-causal) equals the dense block-diagonal mask --
outputs and every gradient, fp32, images and a video frame by frame."""

from pathlib import Path

import torch

from megatron_omni.models.packed_attention import PackedCoreAttention
from megatron_omni.models.vision import NaViTEncoder, VisionConfig

TINY = Path(__file__).resolve().parents[2] / "configs/model/vision_tiny.yaml"
# two images of different sizes and a 4-frame video (t=2 after temporal patching): 4 segments
GRID = torch.tensor([[1, 4, 6], [1, 6, 8], [2, 4, 4]])


def test_thd_torch_path_equals_the_dense_mask():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_omni.convert.mcore_io import megatron_world

    cfg = VisionConfig.from_yaml(str(TINY))
    pixels = torch.randn(int(GRID.prod(-1).sum()), cfg.patch_dim, generator=torch.Generator().manual_seed(1))
    with megatron_world():
        torch.manual_seed(0)
        dense = NaViTEncoder(cfg, packed_attention="dense").train()
        thd = NaViTEncoder(cfg, packed_attention="auto").train()  # no TE here: auto = torch
        thd.load_state_dict(dense.state_dict())
        core = thd.decoder.layers[0].self_attention.core_attention
        assert thd.packed_attention == "torch" and isinstance(core, PackedCoreAttention)
        assert type(dense.decoder.layers[0].self_attention.core_attention) is DotProductAttention
        mask, packed = thd.attention_inputs(GRID, torch.device("cpu"))
        assert mask is None and packed.segment_lengths == [24, 48, 16, 16]  # h*w per frame: nothing N x N

        outputs, grads = [], []
        for enc in (dense, thd):
            x = pixels.clone().requires_grad_(True)
            out = enc(x, GRID)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            outputs.append(out.detach())
            grads.append({"pixels": x.grad, **{n: p.grad for n, p in enc.named_parameters()}})
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-5, msg=name)
