"""ditloc: find where a diffusion transformer keeps a concept, prove it, edit only there."""

from ._version import __version__
from .errors import BadOption, ConceptNotFound, DitlocError, UnsupportedModel  # noqa: E402
from .adapters import get_adapter, supported_families  # noqa: E402
from .localization import Localization, SearchConfig, localize  # noqa: E402
from .localization.presence import presence  # noqa: E402
from .intervene import generate  # noqa: E402
from .text import derive_clean_prompt  # noqa: E402
from .contexts import Intervention, injected, withheld  # noqa: E402
from .tokens import ConceptSpan  # noqa: E402
from . import toy  # noqa: E402, F401  (ditloc.toy.load_pipeline() after a plain `import ditloc`)
from . import edit  # noqa: E402, F401  (ditloc.edit.unlearn(...) after a plain `import ditloc`)
from .attacks import attack  # noqa: E402  (ditloc.attack(pipe, concept, ...); the package: ditloc.attacks)

__all__ = [
    "BadOption",
    "ConceptNotFound",
    "ConceptSpan",
    "DitlocError",
    "Intervention",
    "Localization",
    "SearchConfig",
    "derive_clean_prompt",
    "generate",
    "get_adapter",
    "injected",
    "localize",
    "presence",
    "supported_families",
    "UnsupportedModel",
    "injected",
    "withheld",
    "__version__",
    "attack",
]
