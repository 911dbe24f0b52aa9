"""megatron side of a conversion: the checkpoint structure, a streaming writer and a slice reader.

Writing.  A megatron-omni checkpoint is megatron-core's `torch_dist` format: a PyTorch
distributed checkpoint whose tensors are keyed by *global* names (layers stacked on a
prepended axis), plus megatron's `common.pt` and `metadata.json`.  Its structure (keys,
global shapes, the `_extra_state` objects, the SwiGLU fc1 factory) is taken from the real
megatron model, built with every parameter on the `meta` device, so it costs no memory
and cannot drift from what `load_checkpoint` asks for.  The save itself is megatron's
`dist_checkpointing.save` with its `torch_dist` strategy; only the storage writer
differs: instead of resolving every tensor up front (megatron's writer first stages the
whole state dict in memory), it asks a provider for each chunk as it writes it and drops
it afterwards.  Peak memory is one tensor, whatever the model size.

Because the checkpoint is keyed by global names, the process layout that *writes* it does
not matter (a TP2xPP2 checkpoint and a TP1 one hold the same tensors); the only
layout-dependent part is the vocabulary padding (a multiple of make_vocab_size_divisible_by
x TP), which the writer builds in from the target TP.

Reading.  `CheckpointReader` lists the checkpoint's tensors (metadata only) and reads
one layer's slice of stacked tensors at a time, straight from the stored chunks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import socket
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from megatron_omni.config.schema import ModelConfig, ParallelConfig

Shape = Tuple[int, ...]
TRACKER_FILE = "latest_checkpointed_iteration.txt"


# --------------------------------------------------------------------------------------
# Process group


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def megatron_world(parallel: Optional[ParallelConfig] = None) -> Iterator[None]:
    """megatron's parallel state for a world of one (gloo, free port) in this process, for the
    duration of the block.  Without a GPU, CUDA is emulated on the CPU (see parallel/cpu_emulation)."""
    from megatron_omni.parallel.initialize import destroy_distributed, initialize_distributed, set_random_seeds

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("the converter runs as one process (it streams; the checkpoint it writes loads at any "
                           "layout); do not launch it with torchrun")
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    saved = {k: os.environ.get(k) for k in names}
    if "WORLD_SIZE" not in os.environ and not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    # conversions run on the CPU, with or without a GPU (a copy: the caller's config stays as it was)
    parallel = dataclasses.replace(parallel or ParallelConfig(), backend="gloo")
    try:
        initialize_distributed(parallel)
        set_random_seeds(0)
        yield
    finally:
        destroy_distributed()
        for k, v in saved.items():  # a later world in this process picks a fresh port
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------------------
# The checkpoint's structure, from a megatron model built on the meta device


class MetaDevice(TorchFunctionMode):
    """Every tensor created inside lands on the `meta` device (shape and dtype only)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _device_constructors():
            kwargs["device"] = torch.device("meta")
        elif func in (torch.Tensor.cuda, torch.Tensor.cpu):
            return args[0]
        elif func is torch.Tensor.to:
            args = tuple(a for i, a in enumerate(args) if i == 0 or not isinstance(a, (torch.device, str, int)))
            kwargs.pop("device", None)
        return func(*args, **kwargs)


def build_meta_chunks(model: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype):
    """This rank's GPTModel chunks with all parameters on `meta` (inside `megatron_world`)."""
    from megatron_omni.models.llama import build_llama_chunks

    with MetaDevice():
        return build_llama_chunks(model, parallel, seq_length=128, params_dtype=dtype)


def model_sharded_state_dict(chunks, dtype: torch.dtype) -> Dict[str, object]:
    """The model part of the sharded state dict, exactly as training/checkpoint.py builds it
    ("model", or "model0".. with virtual pipelining), every tensor re-typed to `dtype`."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_omni.parallel.layout import unwrap

    metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
    chunks = [unwrap(c) for c in chunks]
    if len(chunks) == 1:
        sd = {"model": chunks[0].sharded_state_dict(metadata=metadata)}
    else:
        sd = {f"model{i}": c.sharded_state_dict(metadata=metadata) for i, c in enumerate(chunks)}

    def retype(node):
        for k, v in node.items():
            if isinstance(v, dict):
                retype(v)
            elif isinstance(v, (ShardedTensor, ShardedTensorFactory)) and v.data is not None:
                v.data = torch.empty(v.data.shape, dtype=dtype, device="meta")
                if isinstance(v, ShardedTensor):
                    v.dtype = dtype
    retype(sd)
    return sd


def sharded_tensor_shapes(sd) -> Dict[str, Tuple[Shape, torch.dtype]]:
    """key -> (global shape, dtype) of every ShardedTensor (factories expanded) in a sharded state dict."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out: Dict[str, Tuple[Shape, torch.dtype]] = {}

    def walk(node):
        for v in (node.values() if isinstance(node, dict) else node):
            if isinstance(v, (dict, list)):
                walk(v)
            elif isinstance(v, ShardedTensorFactory):
                built = v.build()
                walk(built if isinstance(built, (dict, list)) else [built])
            elif isinstance(v, ShardedTensor):
                out[v.key] = (tuple(v.global_shape), v.data.dtype if v.data is not None else v.dtype)
    walk(sd)
    return out


# --------------------------------------------------------------------------------------
# Streaming save


@dataclass(frozen=True)
class Chunk:
    """One write item: a region of a global checkpoint tensor."""

    key: str
    offsets: Shape
    sizes: Shape
    dtype: torch.dtype


Provider = Callable[[Chunk], torch.Tensor]


def _lazy_strategy(provider: Provider):
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    from megatron.core.dist_checkpointing.strategies.state_dict_saver import save_state_dict_async_plan
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, SerializationFormat, _write_item
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazyWriter(FileSystemWriterAsync):
        """megatron's torch_dist writer, but each tensor is produced by `provider` when it is written."""

        def prepare_write_data(self, plan, planner):
            prefix = plan.storage_data.prefix
            objects = [(item, planner.resolve_data(item)) for item in plan.items if item.type == WriteItemType.BYTE_IO]
            tensors = [item for item in plan.items if item.type != WriteItemType.BYTE_IO]
            name = f"{prefix}0{DEFAULT_SUFFIX}"
            self.write_buckets = [(os.path.join(self.checkpoint_dir, name), name, (objects, tensors))] \
                if objects or tensors else []
            self.results_queue = queue.Queue() if self.write_buckets else None

        def get_save_function_and_args(self):
            if not self.write_buckets:
                return None, None, []
            return self._write_all, None, []

        def _write_all(self):
            transforms = [self.transforms] if hasattr(self, "transforms") else []
            results = {}
            try:
                for idx, (path, storage_key, (objects, tensors)) in enumerate(self.write_buckets):
                    written = []
                    with open(path, "wb") as stream:
                        for item, data in objects:
                            written.append(_write_item(*transforms, stream, data, item, storage_key,
                                                       serialization_format=SerializationFormat.TORCH_SAVE))
                        for item in tensors:
                            chunk = Chunk(item.index.fqn, tuple(item.tensor_data.chunk.offsets),
                                          tuple(item.tensor_data.chunk.sizes), item.tensor_data.properties.dtype)
                            data = provider(chunk)
                            if tuple(data.shape) != chunk.sizes or data.dtype != chunk.dtype:
                                raise RuntimeError(f"provider gave {data.dtype}{list(data.shape)} for {chunk}")
                            data = data.contiguous()
                            if data.untyped_storage().nbytes() != data.numel() * data.element_size():
                                data = data.clone()  # torch.save writes a view's whole storage
                            written.append(_write_item(*transforms, stream, data, item, storage_key,
                                                       serialization_format=SerializationFormat.TORCH_SAVE))
                            del data
                        stream.flush()
                        os.fsync(stream.fileno())
                    results[idx] = written
            except Exception as e:  # handed to megatron's finalize, which raises it on every rank
                self._error = e
                results = e
            self.results_queue.put(results)

    class LazyStrategy(TorchDistSaveShardedStrategy):
        def __init__(self):
            super().__init__("torch_dist", 1, thread_count=1)

        def async_save(self, sharded_state_dict, checkpoint_dir):
            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
            writer = LazyWriter(checkpoint_dir, thread_count=1)
            self.writer = writer
            ret = save_state_dict_async_plan(
                pyt_state_dict, writer, None, 0,
                planner=MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                         flatten_state_dict=False),
            )[0]
            return self._get_save_and_finalize_callbacks(writer, ret)

    return LazyStrategy()


def save_streaming(sd: Dict[str, object], path: str, provider: Provider) -> None:
    """megatron `dist_checkpointing.save` of `sd` into the (existing, empty) folder `path`,
    with every tensor chunk produced by `provider` at write time."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    strategy = _lazy_strategy(provider)
    try:
        dist_checkpointing.save(sd, path, sharded_strategy=strategy)
    except (Exception, CheckpointException) as e:
        error = getattr(getattr(strategy, "writer", None), "_error", None)
        if error is not None:  # the provider's own error, not megatron's wrapper of it
            raise error from e
        raise


# --------------------------------------------------------------------------------------
# Reading


def resolve_iteration(load: str) -> Tuple[str, str]:
    """(checkpoints root, iter_XXXXXXX folder) for a root with a tracker file or an iter_ folder."""
    load = os.path.abspath(load)
    if os.path.basename(os.path.normpath(load)).startswith("iter_"):
        return os.path.dirname(load), load
    tracker = os.path.join(load, TRACKER_FILE)
    if not os.path.isfile(tracker):
        raise FileNotFoundError(f"{load}: no {TRACKER_FILE}; expected a megatron-omni checkpoints folder "
                                "(or one iter_XXXXXXX folder inside it)")
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker}: expected an iteration number, found {text!r}")
    path = os.path.join(load, f"iter_{int(text):07d}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{tracker} names {path}, which does not exist")
    return load, path


class CheckpointReader:
    """Global tensors of a megatron dist checkpoint, read region by region.

    megatron's `torch_dist` format is a PyTorch distributed checkpoint keyed by megatron's
    global tensor names, so reading a region (one layer of a stacked tensor) means finding the
    stored chunks it overlaps (written at whatever TP/PP; DCP's own resharding helper does that)
    and copying them in.  No process group or megatron model is needed."""

    def __init__(self, load: str):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.root, self.path = resolve_iteration(load)
        if not os.path.isfile(os.path.join(self.path, "metadata.json")):
            raise FileNotFoundError(f"{self.path}: no metadata.json; not a (complete) megatron dist checkpoint")
        self._metadata = FileSystemReader(self.path).read_metadata()
        self._common: Optional[Dict[str, object]] = None
        self.tensors: Dict[str, Tuple[Shape, torch.dtype]] = {
            k: (tuple(md.size), md.properties.dtype)
            for k, md in self._metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}

    @property
    def common(self) -> Dict[str, object]:
        """megatron's common (non-sharded) state: common.pt, as dist_checkpointing.load_common_state_dict
        reads it (a training checkpoint's optimizer/scheduler entries may unpickle megatron classes)."""
        if self._common is None:
            self._common = torch.load(os.path.join(self.path, "common.pt"), map_location="cpu", weights_only=False)
        return self._common

    def model_keys(self) -> List[str]:
        """Tensor keys of the model (not optimizer state)."""
        return [k for k in self.tensors if not k.startswith("optimizer.")]

    def read(self, requests: Dict[str, Tuple[str, Optional[int]]]) -> Dict[str, torch.Tensor]:
        """{name: (key, layer or None)} -> {name: tensor}.  A layer index reads that slice of a
        stacked tensor (its first axis), without the layer axis."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        result = {}
        for name, (key, layer) in requests.items():
            shape, dtype = self.tensors[key]
            if layer is None:
                offsets, sizes = (0,) * len(shape), tuple(shape)
            else:
                if not 0 <= layer < shape[0]:
                    raise IndexError(f"{key}: layer {layer} of {shape[0]}")
                offsets, sizes = (layer,) + (0,) * (len(shape) - 1), (1,) + tuple(shape[1:])
            items = create_read_items_for_chunk_list(
                key, self._metadata.state_dict_metadata[key],
                [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))])
            out = self._read_items(items, sizes, dtype)
            result[name] = out[0] if layer is not None else out
        return result

    def _read_items(self, items, sizes: Shape, dtype: torch.dtype) -> torch.Tensor:
        """Assemble one region from the stored chunks that overlap it.  Each stored chunk is a
        torch.save blob inside a .distcp file; it is loaded straight from its byte range, and when it
        is exactly the region (a checkpoint written by this converter, or TP1) it is the result, with
        no second copy -- reading a 2 GB embedding costs 2 GB, not 4-6 GB as through dcp.load."""
        from torch.distributed._shard._utils import narrow_tensor_by_index

        out = None
        for item in items:
            info = self._metadata.storage_data[item.storage_index]
            if getattr(info, "transform_descriptors", None):
                raise NotImplementedError(f"{self.path}: stored with transforms {info.transform_descriptors}")
            with open(os.path.join(self.path, info.relative_path), "rb") as f:
                chunk = torch.load(_FileWindow(f, info.offset, info.length), map_location="cpu", weights_only=True)
            whole = (tuple(chunk.shape) == tuple(sizes) and not any(item.storage_offsets)
                     and not any(item.dest_offsets) and tuple(item.lengths) == tuple(sizes))
            if whole and len(items) == 1:
                return chunk if chunk.dtype == dtype else chunk.to(dtype)
            if out is None:
                out = torch.empty(sizes, dtype=dtype)
            src = narrow_tensor_by_index(chunk, item.storage_offsets, item.lengths)
            narrow_tensor_by_index(out, item.dest_offsets, item.lengths).copy_(src)
            del chunk, src
        if out is None:
            raise RuntimeError(f"{self.path}: no stored data for the region {sizes}")
        covered = sum(torch.Size(i.lengths).numel() for i in items)
        if covered != torch.Size(sizes).numel():
            raise RuntimeError(f"{self.path}: stored chunks cover {covered} of {torch.Size(sizes).numel()} elements")
        return out


class _FileWindow:
    """A read-only, seekable view of bytes [offset, offset + length) of an open file (for torch.load)."""

    def __init__(self, f, offset: int, length: int):
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or self.pos + n > self.length:
            n = self.length - self.pos
        self.f.seek(self.offset + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        n = min(len(view), self.length - self.pos)
        self.f.seek(self.offset + self.pos)
        got = self.f.readinto(view[:n])
        self.pos += got
        return got

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, min(self.length, base + pos))
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True
