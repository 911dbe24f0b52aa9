"""Per-stage data blends (``configs/data/<stage>.yaml``) and the held-out validation split.

    stage: it2
    max_image_tokens: 2560     # paper Table 2
    max_video_frames: 16       # paper Table 2
    pure_text_share: 0.25      # paper Sec. 3.3
    validation: {image: 8, video: 4, text: 4}
    sources:
      - {name: caption, manifest: manifests/caption.jsonl, modality: image, weight: 2.0}

Manifest paths are relative to ``data.root``.  ``validation[m]`` samples of modality m are held
out of training (the S_i x B_i validation samples the adaptive balancer evaluates, Sec. 3.2).
The split is a pure function of (seed, source name, row id): deterministic across runs and
ranks, disjoint from training, and stable when rows are appended to a manifest.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from megatron_omni.config.loader import ConfigError, from_dict, load_yaml_tree
from megatron_omni.data.manifest import MODALITIES, ManifestRow, read_manifest
from megatron_omni.rl.rewards import RewardError, check_reward_weights

__all__ = ["BlendSource", "BlendConfig", "SourceSplit", "load_blend", "split_heldout", "read_blend_manifests"]


@dataclass
class BlendSource:
    name: str
    manifest: str  # JSONL path relative to data.root
    modality: str  # text | image | video | audio (must match the manifest rows)
    weight: float = 1.0  # sampling weight among the sources of the same modality
    # GSPO stage: the rule rewards scoring this source's rollouts and their weights, e.g.
    # {numeric: 1.0, format: 0.1} (megatron_omni/rl/rewards.py); the reward is the weighted sum.
    rewards: Optional[Dict[str, float]] = None


@dataclass
class BlendConfig:
    stage: str
    sources: List[BlendSource] = field(default_factory=list)
    # Share of pure-text samples whenever the LLM is trained (paper Sec. 3.3: "around 25%").
    pure_text_share: float = 0.25
    # Held-out validation samples per modality (Sec. 3.2, S_i x B_i).
    validation: Dict[str, int] = field(default_factory=dict)
    # Paper Table 2: max image tokens 320 (PT1-3) / 1280 (IT1) / 2560 (IT2, IT3, AT).
    max_image_tokens: int = 320
    # Paper Table 2: max video frames 8 (PT3) / 16 (IT2) / 128 (IT3, AT); None = no video this stage.
    max_video_frames: Optional[int] = None
    # LLM tokens of one whole video clip (data/media/geometry.plan_video splits them over its temporal
    # groups); None = max_image_tokens.  Not in the paper: 128 frames in 2560 tokens leave 20 tokens a
    # frame, so the long-video stages set their own budget (configs/data/it3.yaml).
    max_video_tokens: Optional[int] = None
    seed: int = 1234  # of the held-out split

    def __post_init__(self):
        where = f"blend {self.stage!r}"
        if not self.sources:
            raise ConfigError(f"{where}: no sources; list at least one {{name, manifest, modality, weight}}")
        names = [s.name for s in self.sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"{where}: duplicate source name(s) {sorted(dup)}; names must be unique")
        for s in self.sources:
            if s.modality not in MODALITIES:
                raise ConfigError(f"{where}: source {s.name!r} modality {s.modality!r}; use one of {', '.join(MODALITIES)}")
            if not s.weight > 0:
                raise ConfigError(f"{where}: source {s.name!r} weight must be > 0, got {s.weight}")
            if s.rewards is not None:
                try:
                    check_reward_weights(s.rewards, f"{where}: source {s.name!r}")
                except RewardError as e:
                    raise ConfigError(str(e)) from None
            if s.modality == "video" and not self.max_video_frames:
                raise ConfigError(f"{where}: source {s.name!r} is video but max_video_frames is not set (Table 2)")
        if not 0.0 <= self.pure_text_share < 1.0:
            raise ConfigError(f"{where}: pure_text_share must be in [0, 1), got {self.pure_text_share}")
        modalities = set(self.modalities)
        for m, n in self.validation.items():
            if m not in modalities:
                raise ConfigError(f"{where}: validation names modality {m!r} but no source has it; "
                                  f"modalities here: {sorted(modalities)}")
            if int(n) < 0:
                raise ConfigError(f"{where}: validation[{m}] must be >= 0, got {n}")
        if self.max_image_tokens < 4:
            raise ConfigError(f"{where}: max_image_tokens must be >= 4, got {self.max_image_tokens}")
        if self.max_video_tokens is not None and self.max_video_tokens < 4:
            raise ConfigError(f"{where}: max_video_tokens must be >= 4 (or null = max_image_tokens), "
                              f"got {self.max_video_tokens}")

    @property
    def modalities(self) -> List[str]:
        """Modalities of this stage, in first-appearance order."""
        return list(dict.fromkeys(s.modality for s in self.sources))

    def manifest_path(self, source: BlendSource, root: str) -> str:
        return os.path.join(root, source.manifest)


def load_blend(path: str) -> BlendConfig:
    """A blend YAML as a typed BlendConfig (unknown keys rejected with a suggestion)."""
    data = load_yaml_tree(path)
    data.setdefault("stage", os.path.splitext(os.path.basename(path))[0])
    return from_dict(BlendConfig, data, os.path.basename(path))


@dataclass
class SourceSplit:
    train: List[ManifestRow]
    valid: List[ManifestRow]


def _split_key(seed: int, source: str, row_id: str) -> bytes:
    return hashlib.sha1(f"{seed}\0{source}\0{row_id}".encode("utf-8")).digest()


def split_heldout(blend: BlendConfig, rows_by_source: Dict[str, List[ManifestRow]]) -> Dict[str, SourceSplit]:
    """Training / held-out rows per source.

    For modality m the ``validation[m]`` rows with the smallest hash(seed, source, id) over all of
    m's sources are held out: deterministic, disjoint from training, independent of file order.
    """
    splits: Dict[str, SourceSplit] = {}
    for modality in blend.modalities:
        sources = [s for s in blend.sources if s.modality == modality]
        ranked: List[Tuple[bytes, str, int]] = []
        for s in sources:
            rows = rows_by_source[s.name]
            ranked.extend((_split_key(blend.seed, s.name, r.id), s.name, i) for i, r in enumerate(rows))
        ranked.sort()
        n_valid = int(blend.validation.get(modality, 0))
        total = len(ranked)
        if n_valid >= total and n_valid > 0:
            raise ConfigError(f"blend {blend.stage!r}: validation[{modality}] = {n_valid} but the {modality} sources "
                              f"have only {total} samples; hold out fewer")
        held = {(name, i) for _, name, i in ranked[:n_valid]}
        for s in sources:
            rows = rows_by_source[s.name]
            splits[s.name] = SourceSplit(
                train=[r for i, r in enumerate(rows) if (s.name, i) not in held],
                valid=[r for i, r in enumerate(rows) if (s.name, i) in held],
            )
    return splits


def read_blend_manifests(blend: BlendConfig, root: str) -> Dict[str, List[ManifestRow]]:
    """Every source's validated manifest; a row whose modality differs from its source's is an error."""
    out: Dict[str, List[ManifestRow]] = {}
    for s in blend.sources:
        rows = read_manifest(blend.manifest_path(s, root))
        wrong = [r for r in rows if r.modality != s.modality]
        if wrong:
            raise ConfigError(f"{wrong[0].where}: row modality {wrong[0].modality!r} but blend source {s.name!r} is "
                              f"{s.modality!r}; fix the row or the blend")
        out[s.name] = rows
    return out
