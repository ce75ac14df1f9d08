"""Which models this server serves, under which names. Plain data built once at start."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.core.errors import ModelNotFound
from server.core.profiles import ModelProfile, get_profile


@dataclass(frozen=True)
class Catalog:
    default_model: str
    served: tuple[str, ...]
    aliases: dict[str, str] = field(default_factory=dict)
    created: int = 0

    def resolve(self, name: str | None) -> ModelProfile:
        """The profile for a requested model name (None: the default); ``ModelNotFound`` names
        the served models when the name is neither served nor an alias."""
        if name is None or name == "":
            return get_profile(self.default_model)
        target = self.aliases.get(name, name)
        if target not in self.served:
            served = ", ".join(self.served)
            raise ModelNotFound(f"The model '{name}' is not served here. Served models: {served}.", param="model")
        return get_profile(target)

    def profiles(self) -> list[ModelProfile]:
        return [get_profile(model_id) for model_id in self.served]


def resolve_default_model(requested: str, cuda_available: bool) -> str:
    """``auto`` -> z-image-turbo with CUDA, the tiny random-weight demo model without."""
    if requested != "auto":
        get_profile(requested)
        return requested
    return "z-image-turbo" if cuda_available else "tiny-z-image"
