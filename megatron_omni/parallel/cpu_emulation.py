"""Run megatron-core's CUDA-only code paths on the CPU (tests and demos without a GPU).

megatron-core allocates with `device=torch.cuda.current_device()`, moves tensors with
`.cuda()`, checks `param.type() == 'torch.cuda.FloatTensor'`, and forks CUDA RNG states
for tensor-parallel dropout/init.  None of that needs a GPU to be *correct*; it only
needs the CUDA spellings to resolve to the CPU.  This module redirects exactly those
spellings and nothing else, so the model, optimizer, schedules and DDP are the real
megatron-core code running over a gloo process group.

It is test/smoke infrastructure: production code never asks whether it is active.
`enable()` is idempotent and process-wide (it must be, since megatron's own modules
read `torch.cuda.*` at call time); `disable()` restores everything (used by tests).

What is redirected, and why:
  (a) a TorchFunctionMode rewrites `device='cuda'`/`cuda:N`/int device arguments to
      cpu and makes `Tensor.cuda()` the identity;
  (b) `torch.cuda.current_device()` returns the cpu device, so `device=current_device()`
      lands on the CPU without further rewriting;
  (c) CUDA RNG get/set/seed (torch.cuda.* and megatron's tensor-parallel tracker
      helpers) act on the CPU default generator, so `get_cuda_rng_tracker().fork()`
      still gives each TP rank its own dropout/init stream;
  (d) `Tensor.type()` reports `torch.cuda.*` names (megatron's optimizer and
      grad-clipping assert on them);
  (e) streams, events, synchronize and memory queries become no-ops / zeros;
  (f) `moe_utils.te_general_gemm` is defined as None (megatron 0.16 leaves it undefined
      when Transformer Engine is missing, a NameError in the MoE router);
  (g) megatron's "CPU RNG state changed within GPU RNG context" warning is filtered: with
      one generator standing in for both, every RNG use inside a fork trips it;
  (h) the MoE all-to-all dispatcher's split sizes: megatron turns them into numpy arrays only
      when they are CUDA tensors (`maybe_move_tensor_to_cpu(..., as_numpy=True)`); emulated they
      are CPU tensors already, which `all_to_all_single` rejects, so CPU tensors convert too;
  (i) sequence parallelism for the local spec's `WrappedTorchNorm` (megatron asserts it off: its
      GPU norms are TE/apex).  A norm is per token, so it runs unchanged on a sequence shard; the
      weight gets the `sequence_parallel` mark with which finalize_model_grads all-reduces its
      gradient over TP, as TE's norms do.  MoE with TP > 1 needs it (megatron requires SP there);
  (j) list-form `all_gather` / `reduce_scatter` with uneven pieces (the MoE dispatcher's expert-TP
      gather/scatter of a variable token count): NCCL takes uneven pieces, gloo does not, so the
      pieces are padded to the largest (all_gather) or reduced whole with all_reduce and sliced
      (reduce_scatter).  Same results, more bytes -- test infrastructure only.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from typing import Any, Dict, List, Tuple

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")
_lock = threading.Lock()
_state: Dict[str, Any] = {"mode": None, "saved": []}


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # Bare ints mean "cuda:N" to torch factory functions.
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # (d): megatron compares these names; report the CUDA spelling.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs["device"] = _CPU
        if func in (torch.Tensor.to, torch.Tensor.new_empty, torch.Tensor.new_zeros) and args:
            args = tuple(_CPU if i > 0 and _is_cuda_device(a) and not isinstance(a, int) else a
                         for i, a in enumerate(args))
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cpu_get_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int, *args, **kwargs) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, i.e. back into us.
    torch.default_generator.manual_seed(int(seed))


def _patches() -> List[Tuple[Any, str, Any]]:
    """(object, attribute, replacement) for every redirected spelling."""
    import megatron.core.tensor_parallel.random as mcore_random

    null = lambda *a, **k: None  # noqa: E731
    patches: List[Tuple[Any, str, Any]] = [
        (torch.cuda, "current_device", lambda: _CPU),
        (torch.cuda, "set_device", null),
        (torch.cuda, "device_count", lambda: 1),
        (torch.cuda, "synchronize", null),
        (torch.cuda, "empty_cache", null),
        (torch.cuda, "Stream", _NullStream),
        (torch.cuda, "Event", _NullStream),
        (torch.cuda, "current_stream", lambda *a, **k: _NullStream()),
        (torch.cuda, "default_stream", lambda *a, **k: _NullStream()),
        (torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext()),
        (torch.cuda, "memory_allocated", lambda *a, **k: 0),
        (torch.cuda, "memory_reserved", lambda *a, **k: 0),
        (torch.cuda, "max_memory_allocated", lambda *a, **k: 0),
        (torch.cuda, "get_rng_state", _cpu_get_rng_state),
        (torch.cuda, "set_rng_state", _cpu_set_rng_state),
        (torch.cuda, "manual_seed", _cpu_manual_seed),
        (torch.cuda.random, "get_rng_state", _cpu_get_rng_state),
        (torch.cuda.random, "set_rng_state", _cpu_set_rng_state),
        (mcore_random, "_get_cuda_rng_state", _cpu_get_rng_state),
        (mcore_random, "_set_cuda_rng_state", _cpu_set_rng_state),
    ]
    try:  # (f) megatron 0.16 NameError without Transformer Engine
        import megatron.core.transformer.moe.moe_utils as moe_utils

        if not hasattr(moe_utils, "te_general_gemm"):
            patches.append((moe_utils, "te_general_gemm", None))
    except ImportError:
        pass
    try:  # (h) MoE all-to-all split sizes as numpy, as on a GPU
        import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

        patches.append((token_dispatcher, "maybe_move_tensor_to_cpu", _cpu_maybe_move_tensor_to_cpu))
    except ImportError:
        pass
    patches += [  # (j)
        (torch.distributed, "all_gather", _uneven_all_gather(torch.distributed.all_gather)),
        (torch.distributed, "reduce_scatter", _reduce_scatter_by_all_reduce),
    ]
    try:  # (i) sequence-parallel local norms
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        patches.append((WrappedTorchNorm, "__new__", _sequence_parallel_torch_norm(WrappedTorchNorm.__new__)))
    except ImportError:
        pass
    return patches


def _uneven_all_gather(original):
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if len({tuple(t.shape) for t in tensor_list}) <= 1:
            return original(tensor_list, tensor, group=group, async_op=async_op)
        if async_op:
            raise NotImplementedError("CPU emulation: async all_gather of uneven pieces")
        rows = max(t.shape[0] for t in tensor_list)
        padded_input = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded_input[: tensor.shape[0]] = tensor
        padded = [tensor.new_empty((rows, *tensor.shape[1:])) for _ in tensor_list]
        original(padded, padded_input, group=group)
        for out, piece in zip(tensor_list, padded):
            out.copy_(piece[: out.shape[0]])
        return None

    return all_gather


def _reduce_scatter_by_all_reduce(output, input_list, op=None, group=None, async_op=False):
    import torch.distributed as dist

    if async_op:
        raise NotImplementedError("CPU emulation: async reduce_scatter")
    flat = torch.cat([t.reshape(-1) for t in input_list])
    dist.all_reduce(flat, op=op if op is not None else dist.ReduceOp.SUM, group=group)
    rank = dist.get_rank(group)
    start = sum(t.numel() for t in input_list[:rank])
    output.copy_(flat[start : start + output.numel()].view_as(output))
    return None


def _sequence_parallel_torch_norm(original_new):
    def new(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, *args, **kwargs)
        norm = original_new(cls, _without_sequence_parallel(config), *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    return new


def _without_sequence_parallel(config):
    clone = copy.copy(config)
    object.__setattr__(clone, "sequence_parallel", False)
    return clone


def _cpu_maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


_MISSING = object()


class _SharedGeneratorWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


_RNG_LOGGER = "megatron.core.tensor_parallel.random"
_rng_filter = _SharedGeneratorWarningFilter()


def enable() -> None:
    """Redirect CUDA spellings to the CPU for the rest of the process (idempotent)."""
    with _lock:
        if _state["mode"] is not None:
            return
        if torch.cuda.is_available():
            raise RuntimeError("CPU emulation of CUDA requested on a machine with a GPU; use the GPU")
        saved = []
        for obj, name, repl in _patches():
            saved.append((obj, name, getattr(obj, name, _MISSING)))
            setattr(obj, name, repl)
        mode = _CudaToCpuMode()
        mode.__enter__()
        logging.getLogger(_RNG_LOGGER).addFilter(_rng_filter)
        _state.update(mode=mode, saved=saved)
    log.info("CUDA emulated on CPU: megatron-core runs its CUDA code paths over gloo on the CPU")


def disable() -> None:
    """Undo `enable()` (tests)."""
    with _lock:
        mode = _state["mode"]
        if mode is None:
            return
        mode.__exit__(None, None, None)
        logging.getLogger(_RNG_LOGGER).removeFilter(_rng_filter)
        for obj, name, old in reversed(_state["saved"]):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        _state.update(mode=None, saved=[])


def is_enabled() -> bool:
    return _state["mode"] is not None
