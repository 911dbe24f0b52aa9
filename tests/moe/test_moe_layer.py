"""The MoE layer with null experts, checked against independent per-token references.

One-process megatron world (gloo, CUDA emulated on CPU): the real megatron MoELayer, token
dispatcher and SequentialMLP experts; the references below recompute each token's output by
calling the expert MLP modules directly on that token.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_omni.convert.mcore_io import megatron_world
from megatron_omni.models.init import init_weights_layout_invariant
from megatron_omni.models.llama import build_llama_chunks
from megatron_omni.models.moe.router import NullExpertRouter, topp_routing
from megatron_omni.models.moe.stats import collect_routing_stats, set_current_modality
from megatron_omni.config.schema import ParallelConfig
from tests.moe.moe_helpers import tiny_moe_model

TOKENS, BATCH = 16, 2


def _build(model):
    chunks = build_llama_chunks(model, ParallelConfig(), seq_length=64, params_dtype=torch.float32)
    init_weights_layout_invariant(chunks, model, seed=7)
    return chunks


@pytest.fixture(scope="module")
def world():
    with megatron_world():
        yield


def _route_by_sign(router: NullExpertRouter, num_real: int, scale: float = 50.0) -> None:
    """Tokens with x[0] > 0 score the null experts far above the real ones, and vice versa;
    dims 1.. spread tokens over the real experts."""
    with torch.no_grad():
        w = torch.zeros_like(router.weight)
        w[num_real:, 0] = scale
        w[:num_real, 0] = -scale
        w[:num_real, 1 : 1 + num_real] = torch.eye(num_real) * 5.0
        router.weight.copy_(w)


def _reference_moe(layer, x: torch.Tensor, probs_full: torch.Tensor) -> torch.Tensor:
    """shared(x) + sum over selected real experts of p * expert(x), one token at a time."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    experts = layer.experts.local_experts
    for t in range(flat.shape[0]):
        tok = flat[t : t + 1]
        acc = torch.zeros_like(tok)
        for e, expert in enumerate(experts):
            if probs_full[t, e] != 0:
                acc = acc + probs_full[t, e] * expert(tok)[0]
        out[t] = acc[0]
    shared = layer.shared_experts(x).reshape(-1, x.shape[-1])
    return (out + shared).reshape(x.shape)


def test_topp_routing_matches_definition():
    torch.manual_seed(0)
    logits = torch.randn(64, 6) * 2
    for p, k in [(0.5, 3), (0.9, 2), (0.3, 6), (1.0, 4)]:
        probs, routing_map = topp_routing(logits, p, k)
        scores = torch.softmax(logits, dim=-1)
        for t in range(logits.shape[0]):
            order = sorted(range(6), key=lambda e: -scores[t, e].item())
            chosen, mass = [], 0.0
            for e in order:  # definition: add experts by probability until the mass reaches p, <= k
                if mass >= p or len(chosen) == k:
                    break
                chosen.append(e)
                mass += scores[t, e].item()
            assert sorted(torch.nonzero(routing_map[t]).flatten().tolist()) == sorted(chosen), (p, k, t)
            assert torch.allclose(probs[t, chosen], scores[t, chosen])
            assert probs[t].count_nonzero() == len(chosen)
        assert routing_map.sum(1).max() <= k and routing_map.sum(1).min() >= 1


@pytest.mark.parametrize("router_type", ["topk", "topp"])
def test_null_tokens_get_exactly_shared_output_and_are_not_dispatched(world, router_type):
    model = tiny_moe_model(router_type=router_type, router_topp=0.9, aux_loss_coeff=0.0)
    layer = _build(model)[0].decoder.layers[0].mlp
    moe = model.moe
    _route_by_sign(layer.router, moe.num_experts)
    torch.manual_seed(1)
    x = torch.randn(TOKENS, BATCH, model.hidden_size)
    x[: TOKENS // 2, :, 0] = 2.0  # first half: null-only tokens
    x[TOKENS // 2 :, :, 0] = -2.0

    moved = []
    dispatch = layer.token_dispatcher.token_dispatch
    layer.token_dispatcher.token_dispatch = lambda h, p: (moved.append(h.shape[0]), dispatch(h, p))[1]
    with torch.no_grad():
        probs, routing_map = layer.router(x)
        out, _ = layer(x)
    assert routing_map.shape == (TOKENS * BATCH, moe.num_experts)  # null columns never leave the router
    null_tokens = TOKENS // 2 * BATCH
    assert not routing_map[:null_tokens].any()
    # Exactly the shared expert for null-only tokens: same ops on the same input, bit-equal.
    shared = layer.shared_experts(x)
    assert torch.equal(out[: TOKENS // 2], shared[: TOKENS // 2])
    # The dispatcher moved only real selections: none of the null-only tokens.
    assert moved == [int(routing_map.sum())]
    assert moved[0] <= (TOKENS * BATCH - null_tokens) * moe.router_topk
    # Every token against the per-token reference.
    ref = _reference_moe(layer, x, probs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_all_null_batch_dispatches_nothing(world):
    model = tiny_moe_model(aux_loss_coeff=0.0)
    layer = _build(model)[0].decoder.layers[1].mlp
    _route_by_sign(layer.router, model.moe.num_experts)
    x = torch.randn(TOKENS, BATCH, model.hidden_size)
    x[..., 0] = 3.0
    moved = []
    dispatch = layer.token_dispatcher.token_dispatch
    layer.token_dispatcher.token_dispatch = lambda h, p: (moved.append(h.shape[0]), dispatch(h, p))[1]
    with torch.no_grad():
        out, _ = layer(x)
    assert moved == [0]
    assert torch.equal(out, layer.shared_experts(x))


def test_aux_loss_is_switch_loss_over_real_experts(world):
    model = tiny_moe_model(aux_loss_coeff=0.1)
    layer = _build(model)[0].decoder.layers[0].mlp
    router = layer.router
    router.train()
    torch.manual_seed(2)
    x = torch.randn(TOKENS, BATCH, model.hidden_size, requires_grad=True)
    router.counter.reset()
    probs, _ = router(x)
    got = router.counter.counts["all"][-2].item()
    # Independent: E * sum_i f_i P_i over the real experts (Switch Transformer Eq. 4), from the logits.
    E, k = model.moe.num_experts, model.moe.router_topk
    logits = x.detach().reshape(-1, model.hidden_size) @ router.weight.detach().T
    s = torch.softmax(logits.double(), dim=-1)
    top = s.topk(k, dim=-1).indices
    T = logits.shape[0]
    f = torch.stack([(top == i).any(dim=1).double().sum() / (T * k) for i in range(E)])
    P = s[:, :E].mean(0)
    expected = E * float((f * P).sum())
    assert got == pytest.approx(expected, rel=1e-5)
    # The loss reaches the router weight through megatron's MoEAuxLossAutoScaler.
    probs.sum().backward()
    assert router.weight.grad is not None and router.weight.grad[:E].abs().sum() > 0


def test_routing_stats_sum_to_one_per_layer_and_modality(world):
    model = tiny_moe_model(router_type="topp", router_topp=0.6)
    chunks = _build(model)
    chunk = chunks[0]
    chunk.train()
    tokens = torch.randint(0, model.vocab_size, (2, 32))
    pos = torch.arange(32).expand(2, -1)
    for modality, n in (("text", 2), ("image", 1)):
        set_current_modality(chunks, modality)
        for _ in range(n):
            chunk(tokens, pos, None)
    stats = collect_routing_stats(chunks)
    assert set(stats) == {"text", "image"}
    E, N = model.moe.num_experts, model.moe.num_null_experts
    for modality, entry in stats.items():
        assert set(entry["layers"]) == {f"{i:02d}" for i in range(model.num_layers)}
        for layer in entry["layers"].values():
            fractions = [layer[f"e{i}"] for i in range(E)] + [layer[f"null{j}"] for j in range(N)]
            assert math.isclose(sum(fractions), 1.0, rel_tol=1e-12)
            assert math.isclose(layer["null_rate"], sum(fractions[E:]), rel_tol=1e-12)
            assert layer["tokens"] == 64 * (2 if modality == "text" else 1)
            assert 0.0 <= layer["all_null_token_rate"] <= 1.0
    assert collect_routing_stats(chunks) == {}  # reset after collecting


def test_capacity_factor_drops_lowest_probability_selections(world):
    model = tiny_moe_model(aux_loss_coeff=0.0, capacity_factor=0.5)
    router = _build(model)[0].decoder.layers[0].mlp.router
    E, k = model.moe.num_experts, model.moe.router_topk
    torch.manual_seed(3)
    x = torch.randn(TOKENS, BATCH, model.hidden_size)
    with torch.no_grad():
        probs, routing_map = router(x)
        # Independent: the same router without a capacity gives the selections; each expert then
        # keeps its `capacity` highest-probability tokens (megatron's "probs" drop policy).
        router.config.moe_expert_capacity_factor = None
        free_probs, free_map = router(x)
    T = TOKENS * BATCH
    capacity = math.ceil(T * k / E * 0.5)
    expected = torch.zeros_like(free_map)
    for e in range(E):
        chosen = torch.nonzero(free_map[:, e]).flatten()
        keep = chosen[free_probs[chosen, e].argsort(descending=True)[:capacity]]
        expected[keep, e] = True
    assert torch.equal(routing_map, expected)
    assert routing_map.sum(0).max() <= capacity < free_map.sum(0).max()
    assert torch.equal(probs, free_probs * expected)
