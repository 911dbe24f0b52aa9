"""The CUDA-on-CPU emulation: each redirected spelling behaves, and disable() restores torch."""

from __future__ import annotations

import pytest
import torch

from megatron_omni.parallel import cpu_emulation


@pytest.fixture
def emulated():
    if torch.cuda.is_available():
        pytest.skip("emulation is for machines without a GPU")
    cpu_emulation.enable()
    yield
    cpu_emulation.disable()


def test_cuda_device_arguments_land_on_cpu(emulated):
    assert torch.empty(3, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.arange(4, device=0).device.type == "cpu"
    x = torch.randn(2)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"


def test_tensor_type_reports_cuda_names(emulated):
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    # Casting with an argument still works.
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64


def test_megatron_rng_tracker_forks_distinct_reproducible_streams(emulated):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the forked stream advanced
    tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), a)  # same seed, same stream


def test_streams_events_and_memory_queries_are_inert(emulated):
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        pass
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == 0


def test_disable_restores_torch():
    if torch.cuda.is_available():
        pytest.skip("emulation is for machines without a GPU")
    original = torch.cuda.current_device
    cpu_emulation.enable()
    cpu_emulation.enable()  # idempotent
    assert cpu_emulation.is_enabled()
    cpu_emulation.disable()
    assert torch.cuda.current_device is original
    assert torch.zeros(1).type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.empty(1, device="cuda")
