"""Silence what a user cannot act on: Lightning's advertising tip, a deprecation inside Lightning, and a notice
about our own model-summary callback. Every warning a user can act on is kept. Installed on import."""

from __future__ import annotations

import logging
import warnings

UNACTIONABLE_MESSAGES = (
    "💡 Tip: For seamless cloud logging",
    "Trainer already configured with model summary callbacks",
)


class _DropUnactionable(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(UNACTIONABLE_MESSAGES)


def install() -> None:
    """Add the filters (idempotent)."""
    # Raised inside Lightning's own pytree helper on every fit with recent torch; nothing in user code causes it.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropUnactionable) for existing in logger.filters):
            logger.addFilter(_DropUnactionable())
