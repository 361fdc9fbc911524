"""structlog JSON logs on stderr. Nothing secret is ever passed to a logger.

structlog imports rich, when it is installed, for the tracebacks of its console renderer
(``structlog.dev``, ``structlog.tracebacks``): about a tenth of a second at start-up that Nexus
never uses (it renders JSON, with plain tracebacks from ``format_exc_info``). So this module,
which ``nexus/__init__.py`` imports first, imports structlog with rich hidden; rich itself stays
importable for anything that asks for it later.
"""

from __future__ import annotations

import logging
import sys


def _import_structlog_without_rich() -> None:
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # `import rich` -> ImportError
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


_import_structlog_without_rich()

import structlog  # noqa: E402 - after the import above, on purpose


def configure_logging(level: str = "info") -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
