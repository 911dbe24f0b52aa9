"""An `OmniLoader` for a stage blend: manifests -> held-out split -> one stream per modality.

    blend = load_blend("configs/data/pt3.yaml")
    loader = build_omni_loader(blend, root=cfg.data.root, tokenizer=tok, vocab=vocab,
                               vision=vision_cfg, audio=audio_cfg,
                               config=LoaderConfig(seq_length=4096, micro_batch_size=1, seed=seed),
                               dp_rank=dp_rank, dp_size=dp_size)

The held-out split is the blend's (`split_heldout`: stable under appended rows); the loader
trains on the rest of every source, mixed within a modality by the sources' weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from megatron_omni.data.blend import BlendConfig, read_blend_manifests, split_heldout
from megatron_omni.data.manifest import ManifestRow
from megatron_omni.data.modality_stream import LoaderConfig, ModalitySpec
from megatron_omni.data.omni_batch import OmniSample
from megatron_omni.data.omni_loader import OmniLoader

__all__ = ["ManifestSource", "build_omni_loader"]


@dataclass
class ManifestSource:
    """Manifest rows as a `SampleSource`: row i -> `build_sample(row, **build_kwargs)` (decodes its media)."""

    rows: List[ManifestRow]
    build_kwargs: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> OmniSample:
        from megatron_omni.data.sample_builder import build_sample

        return build_sample(self.rows[index], **self.build_kwargs)

    def describe(self, index: int) -> str:
        row = self.rows[index]
        media = f" media {', '.join(row.media)}" if row.media else ""
        return f"{row.where} (id {row.id}){media}"


def build_omni_loader(blend: BlendConfig, *, root: str, tokenizer, vocab, vision, audio, config: LoaderConfig,
                      dp_rank: int = 0, dp_size: int = 1, max_video_tokens: Optional[int] = None) -> OmniLoader:
    from megatron_omni.data.chat_template import ChatTemplate

    splits = split_heldout(blend, read_blend_manifests(blend, root))
    build_kwargs = dict(root=root, tokenizer=tokenizer, vocab=vocab, vision=vision, audio=audio,
                        max_image_tokens=blend.max_image_tokens, max_video_frames=blend.max_video_frames,
                        max_video_tokens=max_video_tokens or blend.max_video_tokens,
                        template=ChatTemplate(tokenizer, vocab))
    specs: Dict[str, ModalitySpec] = {}
    for modality in blend.modalities:
        sources = [s for s in blend.sources if s.modality == modality]
        specs[modality] = ModalitySpec(
            sources=[ManifestSource(splits[s.name].train, build_kwargs) for s in sources],
            weights=[s.weight for s in sources],
            names=[s.name for s in sources],
            validation_sources=[ManifestSource(splits[s.name].valid, build_kwargs) for s in sources],
        )
    return OmniLoader(specs, config, dp_rank=dp_rank, dp_size=dp_size)
