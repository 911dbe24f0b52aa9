"""DALI GPU decoding picks the rank's GPU in every decode thread (issue 18), not device 0: a fake
rank (LOCAL_RANK=3) and a recorded `torch.cuda.set_device`, no GPU and no DALI needed."""

import threading

import pytest
import torch

from megatron_omni.data.dali import pipelines


@pytest.fixture
def gpu_rank3(monkeypatch):
    calls = []
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv(pipelines.DEVICE_ENV, "gpu")
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append((threading.current_thread().name, i)))
    monkeypatch.setitem(pipelines._BUILDERS, "image", lambda dev: ("pipe", dev, pipelines.pipeline_device_id(dev)))
    pipelines.device.cache_clear()
    yield calls
    pipelines.device.cache_clear()


def _in_thread(name, fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()), name=name)
    t.start()
    t.join()
    return out[0]


def test_each_decode_thread_selects_the_rank_device(gpu_rank3):
    got = [_in_thread(f"prefetch-{i}", lambda: (pipelines._pipeline("image"), pipelines._pipeline("image")))
           for i in range(2)]
    for first, again in got:
        assert first == again == ("pipe", "gpu", 3)  # DALI device_id = the rank's GPU; built once per thread
    assert gpu_rank3 == [("prefetch-0", 3), ("prefetch-1", 3)]  # once per thread, device 3, never 0


def test_cpu_decoding_selects_no_device(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pipelines.pipeline_device_id("cpu") is None
    assert pipelines.pipeline_device_id("gpu") == 3
