"""Tensor-parallel LoRA on the real megatron GPTModel (tiny Llama config, fp32, gloo worlds).

Reference: the single-rank (TP1) run.  TP2 must give the same per-token losses and the same
full (gathered) adapter gradients (sequence parallelism: on a column -> row linear pair, since
the CPU layer spec cannot build a sequence-parallel GPTModel); merging the adapters
must reproduce the adapter model; switching them off must reproduce the base model.

Run by pytest through torchrun; this file is also the worker:
    torchrun --nproc_per_node N tests/models/test_lora.py OUT.pt
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SEQ, BATCH, RANK, ALPHA = 16, 2, 4, 8.0


# ----------------------------------------------------------------------------- worker
def _worker(out_path: str) -> None:
    import torch.distributed as dist

    from megatron_omni.config.schema import ParallelConfig
    from megatron_omni.parallel.initialize import destroy_distributed, initialize_distributed, set_random_seeds

    tp = int(os.environ["WORLD_SIZE"])
    initialize_distributed(ParallelConfig(tp=tp))
    set_random_seeds(1234)
    results = {"gpt": _gpt(tp), "mlp": _mlp_pair(tp, sequence_parallel=tp > 1)}
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    destroy_distributed()


def _gpt(tp: int):
    """The tiny Llama GPTModel with LoRA on all four targets: outputs, full adapter grads, merge."""
    from megatron.core import parallel_state

    from megatron_omni.config.loader import load_section_file
    from megatron_omni.config.schema import ModelConfig, ParallelConfig
    from megatron_omni.models import lora
    from megatron_omni.models.init import init_weights_layout_invariant
    from megatron_omni.models.llama import build_llama_chunks
    from megatron_omni.parallel import layout

    model_cfg = load_section_file(ModelConfig, str(REPO / "configs/model/tiny_llm.yaml"))
    model_cfg.transformer_impl = "local"
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model_cfg.vocab_size, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, model_cfg.vocab_size, (BATCH, SEQ), generator=gen)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    group = parallel_state.get_tensor_model_parallel_group()
    (model,) = build_llama_chunks(model_cfg, ParallelConfig(tp=tp), seq_length=SEQ, params_dtype=torch.float32)
    init_weights_layout_invariant([model], model_cfg, seed=1)
    model.eval()  # no dropout anywhere; LoRA dropout 0 too

    def run():
        return model(tokens, position_ids, None, labels=labels)  # per-token loss [b, s]

    with torch.no_grad():
        base = run()
    added = lora.apply_lora(model, rank=RANK, alpha=ALPHA, seed=5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # B starts at zero (LoRA's identity start): draw it layout-invariantly so that the
    # adapters change the output and A receives gradient.
    gated = {}
    with torch.no_grad():
        assert all(float(a.lora_B.abs().max()) == 0.0 for a in added)
        for name, p in layout.global_named_parameters(model):
            if name.endswith("lora.lora_B"):
                gated[name] = "linear_fc1" in name
                full = torch.randn(layout.full_shape(p, tp), generator=torch.Generator().manual_seed(
                    sum(map(ord, name)))) * 0.05
                p.copy_(layout.shard(full, p, tp, parallel_state.get_tensor_model_parallel_rank(), gated=gated[name]))
    out = run()
    out.sum().backward()
    with torch.no_grad(), lora.adapters_disabled(model):
        disabled = run()
    grads, attrs = {}, {}
    for name, p in layout.global_named_parameters(model):
        if p.requires_grad:
            grads[name] = layout.gather(p.grad, p, group, gated=gated.get(name, False)).clone()
            attrs[name] = (bool(getattr(p, "tensor_model_parallel", False)), getattr(p, "partition_dim", None),
                           bool(getattr(p, "sequence_parallel", False)))
    sharded_keys = {k: type(v).__name__ for k, v in model.sharded_state_dict().items() if ".lora." in k}
    with torch.no_grad():
        n_merged = lora.merge_lora(model)
        merged = run()
    return dict(
        base=base, out=out.detach(), disabled=disabled, merged=merged, grads=grads, attrs=attrs,
        trainable=trainable, n_merged=n_merged, n_adapters=len(added),
        trainable_numel=sum(p.numel() for a in added for p in (a.lora_A, a.lora_B)),
        params_after_merge=sorted(n for n, _ in model.named_parameters()), sharded_keys=sharded_keys,
    )


def _mlp_pair(tp: int, sequence_parallel: bool):
    """A column -> row linear pair with LoRA, sequence parallel when tp > 1.

    (megatron's local layer spec, the only one on CPU, cannot build a GPTModel with sequence
    parallelism: its torch norms refuse it; the adapters only see the two linear layers.)"""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from megatron_omni.models import lora
    from megatron_omni.parallel import layout

    hidden, ffn, seq, batch = 16, 24, 8, 2
    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=2, tensor_model_parallel_size=tp,
                               sequence_parallel=sequence_parallel, params_dtype=torch.float32, add_bias_linear=False)
    init = torch.nn.init.zeros_
    pair = torch.nn.Module()
    pair.linear_fc1 = ColumnParallelLinear(hidden, ffn, config=config, init_method=init, bias=False, gather_output=False)
    pair.linear_fc2 = RowParallelLinear(ffn, hidden, config=config, init_method=init, bias=False, input_is_parallel=True,
                                        skip_bias_add=False)
    rank = parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    with torch.no_grad():
        for i, (name, p) in enumerate(pair.named_parameters()):
            full = torch.randn(layout.full_shape(p, tp), generator=torch.Generator().manual_seed(i)) * 0.2
            p.copy_(layout.shard(full, p, tp, rank))
    lora.apply_lora(pair, ("linear_fc1", "linear_fc2"), rank=RANK, alpha=ALPHA, seed=3)
    with torch.no_grad():
        for name, p in pair.named_parameters():
            if name.endswith("lora_B"):
                full = torch.randn(layout.full_shape(p, tp), generator=torch.Generator().manual_seed(len(name))) * 0.3
                p.copy_(layout.shard(full, p, tp, rank))
    x = torch.randn(seq, batch, hidden, generator=torch.Generator().manual_seed(9), requires_grad=True)
    x_local = x.chunk(tp, dim=0)[rank].detach().requires_grad_() if sequence_parallel else x
    h, _ = pair.linear_fc1(x_local)
    y, _ = pair.linear_fc2(torch.nn.functional.gelu(h))
    y.pow(2).sum().backward()
    if sequence_parallel:  # the rank's output is its sequence chunk: gather for comparison
        pieces = [torch.empty_like(y) for _ in range(tp)]
        dist.all_gather(pieces, y.detach().contiguous(), group=group)
        y = torch.cat(pieces, dim=0)
        # the full loss is the sum over sequence chunks: grads of replicated factors add up
    grads = {}
    for name, p in pair.named_parameters():
        if p.requires_grad:
            g = p.grad
            if getattr(p, "sequence_parallel", False):
                dist.all_reduce(g, group=group)  # what finalize_model_grads does for these
            grads[name] = layout.gather(g, p, group).clone()
    return {"out": y.detach(), "grads": grads,
            "sp_marked": sorted(n for n, p in pair.named_parameters() if getattr(p, "sequence_parallel", False))}


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _worker(sys.argv[1])
    sys.exit(0)


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.helpers.launch import torchrun

    d = tmp_path_factory.mktemp("lora")
    # Both worlds at once: most of each launch is interpreter and megatron start-up.
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda n: torchrun(n, [str(Path(__file__).resolve()), str(d / f"tp{n}.pt")], timeout=300),
                      (1, 2)))
    return {n: torch.load(d / f"tp{n}.pt", weights_only=False) for n in (1, 2)}


def test_tp2_sequence_parallel_matches_tp1(runs):
    ref, got = runs[1]["mlp"], runs[2]["mlp"]
    torch.testing.assert_close(got["out"], ref["out"], rtol=1e-5, atol=1e-5)
    assert got["sp_marked"] == ["linear_fc1.lora.lora_A", "linear_fc2.lora.lora_B"]
    assert set(got["grads"]) == set(ref["grads"]) and len(ref["grads"]) == 4
    for name, g_ref in ref["grads"].items():
        assert g_ref.abs().max() > 0, name
        assert (got["grads"][name] - g_ref).abs().max().item() <= 1e-5 * g_ref.abs().max().item(), name


def test_tp2_matches_tp1(runs):
    ref, got = runs[1]["gpt"], runs[2]["gpt"]
    torch.testing.assert_close(got["out"], ref["out"], rtol=1e-5, atol=1e-5)
    assert set(got["grads"]) == set(ref["grads"])
    assert len(ref["grads"]) == 4 * 4 * 2  # 4 layers x 4 targets x (A, B)
    for name, g_ref in ref["grads"].items():
        scale = g_ref.abs().max().item()
        assert scale > 0, f"{name}: zero gradient in the reference"
        assert (got["grads"][name] - g_ref).abs().max().item() <= 1e-5 * scale, name


def test_tp_attributes_follow_the_base_layer(runs):
    attrs = runs[2]["gpt"]["attrs"]
    for name, (sharded, dim, sp) in attrs.items():
        column = "linear_qkv" in name or "linear_fc1" in name
        factor_sharded = name.endswith("lora_B") if column else name.endswith("lora_A")
        assert sharded == factor_sharded, name
        if sharded:
            assert dim == (0 if column else 1), name
        assert not sp
    keys = runs[2]["gpt"]["sharded_keys"]
    assert len(keys) == 32
    # fc1's gated B goes through megatron's SwiGLU checkpoint factory, like fc1's weight.
    assert {v for k, v in keys.items() if "linear_fc1.lora.lora_B" in k} == {"ShardedTensorFactory"}
    assert {v for k, v in keys.items() if "linear_fc1.lora.lora_B" not in k} == {"ShardedTensor"}


@pytest.mark.parametrize("tp", [1, 2])
def test_disabled_is_base_and_merged_is_adapted(runs, tp):
    r = runs[tp]["gpt"]
    assert (r["out"] - r["base"]).abs().max() > 1e-3  # the adapters do change the model
    torch.testing.assert_close(r["disabled"], r["base"], rtol=0, atol=0)
    torch.testing.assert_close(r["merged"], r["out"], rtol=1e-5, atol=1e-5)
    assert r["n_merged"] == r["n_adapters"] == 16
    assert not any(".lora." in n for n in r["params_after_merge"])


def test_only_adapters_train(runs):
    r = runs[1]["gpt"]
    assert r["trainable"] and all(n.endswith(("lora.lora_A", "lora.lora_B")) for n in r["trainable"])
    assert len(r["trainable"]) == 32


def test_trainable_fraction_matches_the_formula(runs):
    from megatron_omni.config.loader import load_section_file
    from megatron_omni.config.schema import ModelConfig
    from megatron_omni.models.lora import lora_params_per_rank

    tiny = load_section_file(ModelConfig, str(REPO / "configs/model/tiny_llm.yaml"))
    assert runs[1]["gpt"]["trainable_numel"] == RANK * lora_params_per_rank(tiny)


def test_rank_for_five_percent_of_llama3_8b():
    from megatron_omni.config.loader import load_section_file
    from megatron_omni.config.schema import ModelConfig
    from megatron_omni.models.lora import backbone_params, lora_params_per_rank, lora_rank_for_fraction
    from megatron_omni.planner.memory import param_counts

    cfg = load_section_file(ModelConfig, str(REPO / "configs/model/llama3_8b.yaml"))
    n = backbone_params(cfg)
    assert n == pytest.approx(8.03e9, rel=0.01)  # Llama-3.1-8B's published size
    assert abs(n - param_counts(cfg).total) < cfg.hidden_size * 256  # planner's count (padded vocab)
    r = lora_rank_for_fraction(cfg, 0.05)
    # per unit rank: 32 layers x [(4096+6144) + (4096+4096) + (4096+28672) + (14336+4096)] = 2,228,224
    assert lora_params_per_rank(cfg) == 2_228_224
    assert r == 180
    assert r * lora_params_per_rank(cfg) / n == pytest.approx(0.05, abs=0.0005)
