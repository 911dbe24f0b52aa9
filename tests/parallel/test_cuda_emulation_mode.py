"""`parallel.cuda_emulation` (issue 18): auto emulates only where no NVIDIA driver/device exists; a
present driver whose CUDA fails is one clear error; on forces, off refuses.  Detection is
monkeypatched (no GPU on the test machine)."""

import pytest
import torch

from megatron_omni.config import ConfigError, load_config, validate
from megatron_omni.parallel import initialize
from megatron_omni.parallel.initialize import use_cuda_emulation


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(initialize, "_cuda_failure", lambda: "CUDA driver version is insufficient")
    return monkeypatch


def test_auto_emulates_only_without_any_nvidia_driver_or_device(no_cuda):
    no_cuda.setattr(initialize, "nvidia_present", lambda: None)
    assert use_cuda_emulation("auto") is True


def test_auto_with_a_driver_but_failing_cuda_is_a_clear_error(no_cuda):
    no_cuda.setattr(initialize, "nvidia_present", lambda: "device nodes /dev/nvidia0")
    with pytest.raises(RuntimeError, match=r"CUDA failed to initialise .*/dev/nvidia0.*insufficient.*"
                                           r"cuda_emulation=on"):
        use_cuda_emulation("auto")


def test_on_forces_and_off_refuses(no_cuda):
    no_cuda.setattr(initialize, "nvidia_present", lambda: None)
    assert use_cuda_emulation("on") is True
    with pytest.raises(RuntimeError, match="cuda_emulation=off but CUDA is not available"):
        use_cuda_emulation("off")


def test_working_cuda_is_used_unless_forced(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert use_cuda_emulation("auto") is False and use_cuda_emulation("off") is False
    assert use_cuda_emulation("on") is True


def test_this_machine_has_no_nvidia_driver_so_auto_emulates():
    # the CPU machine the suite runs on: the real detection must find nothing
    if torch.cuda.is_available():
        pytest.skip("a GPU machine")
    assert initialize.nvidia_present() is None


def test_config_key_is_validated():
    assert load_config("configs/tiny/llm.yaml").parallel.cuda_emulation == "auto"
    with pytest.raises(ConfigError, match=r"parallel.cuda_emulation='maybe' is not one of \['auto', 'on', 'off'\]"):
        validate(load_config("configs/tiny/llm.yaml", ["parallel.cuda_emulation=maybe"]), 1)
