"""Which models this server serves, under which names. Plain data built once at start."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from server.core.errors import ModelNotFound
from server.core.profiles import ModelProfile, get_profile

# OpenAI's image model names, present and past (gpt-image-1.5, gpt-image-2-2026-..., chatgpt-image-latest,
# dall-e-3, ...). Applications hard-code them and new snapshots keep appearing, so they are matched by
# prefix, not listed: any of them means "the default model" unless ``model_aliases`` says otherwise.
OPENAI_IMAGE_PREFIXES = ("gpt-image-", "chatgpt-image-", "dall-e-")


def is_openai_image_name(name: str | None) -> bool:
    return bool(name) and name.lower().startswith(OPENAI_IMAGE_PREFIXES)


def is_dalle_name(name: str | None) -> bool:
    """DALL-E clients read ``data[0].url`` without asking for it: their response_format default is url."""
    return bool(name) and name.lower().startswith("dall-e-")


@dataclass(frozen=True)
class Catalog:
    default_model: str
    served: tuple[str, ...]
    aliases: dict[str, str] = field(default_factory=dict)  # exact names or fnmatch patterns ("dall-e-*")
    created: int = 0

    def resolve(self, name: str | None) -> ModelProfile:
        """The profile for a requested model name (None: the default); ``ModelNotFound`` names
        the served models when the name is neither served, an alias nor an OpenAI image name.

        Order: an exact alias, then the longest matching alias pattern, then a served id, then
        the OpenAI name rules (so a configured alias always overrides the built-in rules)."""
        if name is None or name == "":
            return get_profile(self.default_model)
        target = self.alias_target(name)
        if target is None:
            target = name if name in self.served or not is_openai_image_name(name) else self.default_model
        if target not in self.served:
            served = ", ".join(self.served)
            raise ModelNotFound(f"The model '{name}' is not served here. Served models: {served}.", param="model")
        return get_profile(target)

    def alias_target(self, name: str) -> str | None:
        if name in self.aliases:
            return self.aliases[name]
        patterns = [p for p in self.aliases if any(c in p for c in "*?[") and fnmatchcase(name, p)]
        return self.aliases[max(patterns, key=len)] if patterns else None

    def profiles(self) -> list[ModelProfile]:
        return [get_profile(model_id) for model_id in self.served]


def resolve_default_model(requested: str, cuda_available: bool) -> str:
    """``auto`` -> z-image-turbo with CUDA, the tiny random-weight demo model without."""
    if requested != "auto":
        get_profile(requested)
        return requested
    return "z-image-turbo" if cuda_available else "tiny-z-image"
