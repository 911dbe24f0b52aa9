"""Count host syncs (device -> host reads) per call site: a test hook for the training step.

A host sync is any operation that makes the CPU wait for the device: reading a value
(``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()``, ``bool/int/float/index`` of a tensor, printing
one) or an op whose *output shape* depends on tensor values (``nonzero``, ``masked_select``,
boolean-mask indexing, ``unique``, ``repeat_interleave`` without ``output_size``).  On a GPU each
one stalls the launch queue; in a training step they should be few and deliberate (the logged
loss, the grad norm).

    with HostSyncCounter() as syncs:
        train_step(...)
    syncs.total, syncs.by_site()   # {"megatron_omni/models/omni.py:140 embed_multimodal [__int__]": 3, ...}

Two backends:

* ``"torch_function"`` (default; CPU and GPU): a `TorchFunctionMode` that sees every tensor
  method call and counts the ones above.  On a GPU it skips reads of host tensors (no sync
  there).  Under megatron_omni's CUDA emulation every tensor is a host tensor, so it counts every
  read -- also those of tensors that stay on the host in a GPU run (the optimizer's step counters,
  RNG states, the media size metadata): the CPU number is an upper bound of the GPU's.  It also counts host->device copies
  (``.to(device)`` / ``.cuda()``, with their bytes) under `transfers`, which are not syncs but
  show what is copied where (e.g. media sent to every pipeline stage).
* ``"cuda"`` (GPU only): ``torch.cuda.set_sync_debug_mode("warn")`` -- the CUDA caching allocator
  and kernels report every *actual* synchronisation as a warning, which is caught and counted by
  the Python line that triggered it.  No false positives, but it needs a real GPU.

A call site is the innermost frame outside torch (and outside this module): a sync inside
``torch.nn.functional`` is charged to the megatron / megatron_omni line that called it.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import Counter
from typing import Dict, Optional

import torch
from torch.overrides import TorchFunctionMode

# Tensor methods / torch functions that always read device memory on the host.
_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__repr__",
          "__format__", "__array__", "nonzero", "masked_select", "unique", "unique_consecutive",
          "argwhere", "_local_scalar_dense"}
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS = os.path.abspath(__file__)


def _short(path: str) -> str:
    """site-packages/... and repo paths -> package-relative (megatron/core/..., megatron_omni/...)."""
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if marker in path:
            return path.split(marker, 1)[1]
    for pkg in ("megatron_omni" + os.sep, "tests" + os.sep, "tools" + os.sep, "benchmarks" + os.sep):
        idx = path.rfind(os.sep + pkg)
        if idx >= 0:
            return path[idx + 1:]
    return path


def call_site(depth: int = 2) -> str:
    """'file:line function' of the innermost frame outside torch and this module."""
    frame = sys._getframe(depth)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_TORCH_DIR) and os.path.abspath(name) != _THIS and "<frozen" not in name:
            return f"{_short(name)}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "<unknown>"


def _is_sync(name: str, args, kwargs) -> bool:
    if name in _READS:
        return True
    if name == "repeat_interleave":  # output length = sum(repeats) unless given
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if name in ("__getitem__", "__setitem__") and len(args) > 1:  # boolean-mask indexing
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    return False


def _transfer_device(name: str, args, kwargs) -> Optional[str]:
    """The device named by a `.to(...)` / `.cuda()` call, None when it names none."""
    if name == "cuda":
        return "cuda"
    if name != "to":
        return None
    dev = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, (torch.device, str, int)) and not isinstance(a, bool):
            dev = a
    return None if dev is None else str(dev)


def _on_cpu(name: str, args, kwargs) -> bool:
    """The tensor whose values the op reads lives in host memory (then it is no device sync)."""
    t = args[0] if args else None
    if name == "repeat_interleave":
        t = args[1] if len(args) > 1 else kwargs.get("repeats")
    return isinstance(t, torch.Tensor) and t.device.type == "cpu"


def _gpu_run() -> bool:
    """Tensors really live on a GPU (not megatron_omni's CUDA emulation)."""
    from megatron_omni.parallel import cpu_emulation

    return torch.cuda.is_available() and not cpu_emulation.is_enabled()


class _CountingMode(TorchFunctionMode):
    def __init__(self, owner: "HostSyncCounter"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if _is_sync(name, args, kwargs) and (self.owner.count_cpu_tensors or not _on_cpu(name, args, kwargs)):
            self.owner.syncs[f"{call_site()} [{name}]"] += 1
        elif _transfer_device(name, args, kwargs) is not None and isinstance(args[0], torch.Tensor):
            site = call_site()
            self.owner.transfers[site] += 1
            self.owner.transfer_bytes[site] += args[0].numel() * args[0].element_size()
        return func(*args, **kwargs)


class HostSyncCounter:
    """Context manager counting host syncs by call site (see the module docstring)."""

    def __init__(self, backend: str = "torch_function", count_cpu_tensors: Optional[bool] = None):
        if backend not in ("torch_function", "cuda"):
            raise ValueError(f"HostSyncCounter backend must be 'torch_function' or 'cuda', got {backend!r}")
        if backend == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("HostSyncCounter(backend='cuda') needs a GPU (torch.cuda.set_sync_debug_mode); "
                               "use backend='torch_function' on the CPU")
        self.backend = backend
        # Reads of host tensors are no syncs on a GPU; under the CUDA emulation every tensor is a
        # host tensor, so all reads count (None = that choice, made on entry).
        self.count_cpu_tensors = count_cpu_tensors
        self.syncs: Counter = Counter()
        self.transfers: Counter = Counter()
        self.transfer_bytes: Counter = Counter()
        self._mode: Optional[_CountingMode] = None
        self._warnings = None

    @property
    def total(self) -> int:
        return sum(self.syncs.values())

    def by_site(self) -> Dict[str, int]:
        """{call site [op]: count}, most frequent first."""
        return dict(self.syncs.most_common())

    def __enter__(self) -> "HostSyncCounter":
        if self.backend == "torch_function":
            if self.count_cpu_tensors is None:
                self.count_cpu_tensors = not _gpu_run()
            self._mode = _CountingMode(self)
            self._mode.__enter__()
        else:
            self._warnings = warnings.catch_warnings(record=True)
            self._records = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if self.backend == "torch_function":
            self._mode.__exit__(*exc)
            self._mode = None
            return
        torch.cuda.set_sync_debug_mode("default")
        self._warnings.__exit__(*exc)
        for w in self._records:
            if "synchroniz" in str(w.message).lower():
                self.syncs[f"{_short(w.filename)}:{w.lineno} [cuda sync]"] += 1
            else:  # not ours: pass it on
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def report(self, title: str = "host syncs") -> str:
        """A readable table: total, then count by call site."""
        lines = [f"{title}: {self.total}"]
        lines += [f"  {n:4d}  {site}" for site, n in self.by_site().items()]
        if self.transfers:
            lines.append(f"host->device copies: {sum(self.transfers.values())} "
                         f"({sum(self.transfer_bytes.values())} bytes)")
            lines += [f"  {n:4d}  {site}  ({self.transfer_bytes[site]} bytes)"
                      for site, n in self.transfers.most_common()]
        return "\n".join(lines)
