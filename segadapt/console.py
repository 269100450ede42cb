"""What a command prints: the third-party warnings and notices that say nothing to a segadapt user are
filtered here, in one list, when a command starts (:func:`setup_console`, called by ``segadapt`` and the
Hydra scripts). Importing the library changes no filter: a Python user keeps every warning.

Each entry names its source and why it is silenced; the package's own code paths raise none (a test turns
warnings from ``segadapt`` modules into errors on a short fit).
"""

from __future__ import annotations

import codecs
import logging
import sys
import warnings

# (action, message regex, category, module regex): warnings.filterwarnings arguments, one reason each.
THIRD_PARTY_WARNINGS: tuple[tuple[str, str, type[Warning], str], ...] = (
    # torch 2.14 deprecates `isinstance(spec, LeafSpec)`; Lightning's own _pytree helper still does it (every fit)
    ("ignore", r".*LeafSpec.*", FutureWarning, r"lightning\..*|torch\..*"),
    ("ignore", r".*LeafSpec.*", DeprecationWarning, r"lightning\..*|torch\..*"),
    # MONAI 1.6 announces a new default of get_mask_edges inside its own HD95 (compute_hausdorff_distance); the
    # result does not change for the masks we score
    ("ignore", r".*get_mask_edges.*", FutureWarning, r"monai\..*"),
    # Lightning: a validation/test loader of one volume per batch (volumes differ in size) on a 2-core machine
    ("ignore", r".*does not have many workers.*", UserWarning, r"lightning\..*"),
    # Lightning: the run folder is reused on resume (the checkpoint folder is the run folder by design)
    ("ignore", r".*Checkpoint directory .* exists and is not empty.*", UserWarning, r"lightning\..*"),
)

# Lightning's notices on its info logger that are advertisements, not information about the run.
LIGHTNING_INFO_LOGGER = "lightning.fabric.utilities.rank_zero"
SILENCED_NOTICES: tuple[str, ...] = (
    "💡 Tip:",  # litlogger advertisement, once per Trainer
)


class _DropNotices(logging.Filter):
    """Drops the records whose message starts with one of :data:`SILENCED_NOTICES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith(SILENCED_NOTICES)


_NOTICE_FILTER = _DropNotices()


def filter_third_party_warnings() -> None:
    """Apply :data:`THIRD_PARTY_WARNINGS` and drop Lightning's :data:`SILENCED_NOTICES` (idempotent)."""
    for action, message, category, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings(action, message=message, category=category, module=module)
    logger = logging.getLogger(LIGHTNING_INFO_LOGGER)
    if _NOTICE_FILTER not in logger.filters:
        logger.addFilter(_NOTICE_FILTER)


def tolerate_ascii_console() -> None:
    """On a console that cannot encode Unicode (e.g. ``LC_ALL=C``), print escapes instead of failing.

    Lightning's default progress bar and model summary (rich) write symbols such as U+2022; with an ASCII
    stdout those raise UnicodeEncodeError at the end of a fit. A UTF-8 console is left as it is.
    """
    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None) or "ascii"
        if codecs.lookup(encoding).name != "utf-8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def setup_console() -> None:
    """At the start of a command: third-party warnings filtered, an ASCII console tolerated."""
    filter_third_party_warnings()
    tolerate_ascii_console()
