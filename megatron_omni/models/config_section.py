"""`ConfigSection`: from_dict / from_yaml for a config dataclass defined outside the schema module."""

from __future__ import annotations

from typing import Type, TypeVar

T = TypeVar("T", bound="ConfigSection")


class ConfigSection:
    """Mixin: typed construction with unknown keys rejected (and a suggestion) by the project's loader.
    It lives outside `megatron_omni.config`, and imports the loader lazily, because the run-config
    schema imports the sections themselves (importing the config package here would be circular)."""

    @classmethod
    def from_dict(cls: Type[T], data: dict) -> T:
        from megatron_omni.config.loader import from_dict

        return from_dict(cls, data)

    @classmethod
    def from_yaml(cls: Type[T], path: str) -> T:
        from megatron_omni.config.loader import load_section_file

        return load_section_file(cls, path)
