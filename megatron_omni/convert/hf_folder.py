"""HF model folders: reading one (config, safetensors shards, index) and writing one (streamed shards)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_omni.convert.errors import ProblemList
from megatron_omni.convert.safetensors_io import (
    SafetensorsFormatError,
    SafetensorsReader,
    StreamingWriter,
    TensorInfo,
    read_header,
)

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)


@dataclass
class HFFolder:
    path: str
    config: Dict
    tensors: Dict[str, TensorInfo]
    files: List[str]
    reader: SafetensorsReader = field(default_factory=SafetensorsReader)

    def read(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        t = self.reader.read(self.tensors[name])
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        info = self.tensors[name]
        if out.dtype == info.dtype and out.is_contiguous():
            return self.reader.read_into(info, out)
        return out.copy_(self.reader.read(info))

    def close(self) -> None:
        self.reader.close()


def read_json(path: str, what: str, problems: ProblemList) -> Optional[Dict]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        problems.add("unreadable files", f"{path}: missing ({what})")
        return None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.add("unreadable files", f"{path}: not valid JSON ({e})")
        return None
    if not isinstance(data, dict):
        problems.add("unreadable files", f"{path}: expected a JSON object")
        return None
    return data


def open_hf_folder(path: str) -> HFFolder:
    """Config and every tensor's header of an HF folder; all problems are raised together."""
    problems = ProblemList(f"HF folder {path}")
    if not os.path.isdir(path):
        problems.add("unreadable files", f"{path}: not a directory")
        problems.raise_if_any()
    config = read_json(os.path.join(path, "config.json"), "config.json", problems)
    index_path = os.path.join(path, INDEX_FILE)
    weight_map: Optional[Dict[str, str]] = None
    if os.path.exists(index_path):
        index = read_json(index_path, "the shard index", problems)
        weight_map = (index or {}).get("weight_map")
        if index is not None and not isinstance(weight_map, dict):
            problems.add("unreadable files", f"{index_path}: no weight_map")
            weight_map = None
        files = sorted(set(weight_map.values())) if weight_map else []
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            others = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
            hint = f" (found {others}: re-save them as safetensors)" if others else ""
            problems.add("unreadable files", f"{path}: no *.safetensors files{hint}")
    tensors: Dict[str, TensorInfo] = {}
    unreadable = set()
    for name in files:
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            problems.add("unreadable files", f"{file_path}: listed in {INDEX_FILE} but missing")
            unreadable.add(name)
            continue
        try:
            infos, _ = read_header(file_path)
        except SafetensorsFormatError as e:
            problems.add("unreadable files", str(e))
            unreadable.add(name)
            continue
        for tname, info in infos.items():
            if tname in tensors:
                problems.add("unreadable files", f"tensor {tname} is in both {os.path.basename(tensors[tname].path)} "
                                                 f"and {name}")
            elif weight_map is not None and weight_map.get(tname) != name:
                problems.add("unreadable files", f"tensor {tname} is in {name} but {INDEX_FILE} "
                                                 f"maps it to {weight_map.get(tname)}")
            else:
                tensors[tname] = info
    if weight_map is not None:
        for tname, fname in weight_map.items():
            if tname not in tensors and fname not in unreadable:
                problems.add("unreadable files", f"{INDEX_FILE} maps {tname} to {fname}, which does not hold it")
    problems.raise_if_any()
    return HFFolder(path=path, config=config, tensors=tensors, files=files)


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1000' -> bytes (decimal units, as transformers' max_shard_size)."""
    t = str(text).strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
                       ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def plan_shards(entries: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]], max_bytes: int
                ) -> List[List[Tuple[str, torch.dtype, Tuple[int, ...]]]]:
    """Consecutive tensors into shards of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: List[List] = [[]]
    size = 0
    for entry in entries:
        n = torch.Size(entry[2]).numel() * torch.empty((), dtype=entry[1]).element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


def write_safetensors_shards(out_dir: str, entries: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]],
                             tensors: Iterable[Tuple[str, torch.Tensor]], max_shard_bytes: int,
                             progress=None) -> Dict[str, str]:
    """Stream `tensors` (in `entries` order) into model-0000i-of-0000N.safetensors + the index; returns the weight map."""
    shards = plan_shards(entries, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: Dict[str, str] = {}
    total = 0
    it = iter(tensors)
    done = 0
    for shard, fname in zip(shards, names):
        writer = StreamingWriter(os.path.join(out_dir, fname), shard)
        for name, _, _ in shard:
            got_name, tensor = next(it)
            writer.write(got_name, tensor)
            weight_map[name] = fname
            del tensor
            done += 1
            if progress:
                progress(done, len(entries))
        writer.close()
        total += writer.data_bytes
    leftover = next(it, None)
    if leftover is not None:
        raise RuntimeError(f"producer gave an unplanned tensor {leftover[0]}")
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        f.write("\n")
    return weight_map


def copy_files(src_dir: str, dst_dir: str, names: Sequence[str]) -> List[str]:
    copied = []
    for name in names:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def write_json(path: str, data: Dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
