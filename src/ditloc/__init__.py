"""ditloc: find where a diffusion transformer keeps a concept, prove it, edit only there."""

from ._version import __version__
from .errors import DitlocError  # noqa: E402
from .adapters import get_adapter, supported_families  # noqa: E402
from .localize import Localization, SearchConfig, localize, presence  # noqa: E402
from .intervene import derive_clean_prompt, generate  # noqa: E402
from .contexts import Intervention, injected, withheld  # noqa: E402
from .tokens import ConceptSpan  # noqa: E402
from . import toy  # noqa: E402, F401  (ditloc.toy.load_pipeline() after a plain `import ditloc`)

__all__ = [
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
    "withheld",
    "__version__",
]
