"""What a command prints: the third-party warnings and notices that say nothing to a segadapt user are
filtered here, in one list, when a command starts (:func:`setup_console`, called by ``segadapt`` and the
Hydra scripts; a notebook calls it in its first cell, before its other imports). Importing the library
changes no filter: a Python user keeps every warning.

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
    # torch 2.14 deprecates `LeafSpec`; Lightning's own pytree helper (lightning.pytorch.utilities._pytree) uses it
    ("ignore", r".*LeafSpec.*", FutureWarning, r"lightning\..*|torch\..*"),
    # MONAI's HausdorffDistanceMetric passes get_mask_edges' deprecated `always_return_as_numpy` itself (1.5 - 1.7)
    ("ignore", r".*get_mask_edges:always_return_as_numpy.*", FutureWarning, r"monai\..*"),
    # MONAI's LoadImage always builds its GPU DICOM reader, which says on every CPU machine that it fell back to
    # pydicom (our DICOM series are read by SimpleITK anyway)
    ("ignore", r"NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register.*", UserWarning, r"monai\..*"),
    # Lightning 2.6's CLI calls jsonargparse API deprecated in 4.49 (add_instantiator, instantiate_classes, skip_none)
    ("ignore", r"(?s).*(deprecated in v4\.49|JsonargparseDeprecationWarning per type).*", DeprecationWarning,
     r"lightning\.pytorch\.cli"),
    # SegDataModule validates nothing while fitting without an inner split: its val loader is [] by design
    ("ignore", r"Total length of `list` across ranks is zero.*", UserWarning, r"lightning\..*"),
    # tqdm.auto in a Jupyter kernel without ipywidgets falls back to its text bar and says so when imported
    # (segadapt's bars are text bars); a TqdmWarning, named by its base class so that tqdm need not be imported
    ("ignore", r"IProgress not found.*", Warning, r"tqdm\..*"),
)

# Log records of third-party loggers that are advertisements or say the same as a filtered warning:
# (logger name, start of the message).
SILENCED_RECORDS: tuple[tuple[str, str], ...] = (
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip:"),  # the litlogger advertisement, once per Trainer
    ("lightning.fabric.utilities.rank_zero", "💡 Tip:"),   # the same where only lightning.fabric is imported
    ("monai.data.nvimgcodec_pydicom_plugin", "nvImageCodec is not available"),  # see NvImgCodecPydicomReader above
)

# Loggers whose INFO records a command does not show (set to WARNING; their warnings still show):
QUIET_LOGGERS: tuple[str, ...] = (
    # Lightning's rank-zero notices, a block per Trainer ("GPU available: ...", "TPU available: ...", "HPU
    # available: ...", "`Trainer.fit` stopped: `max_steps=2` reached."): 19 lines in a 12-run sweep. Lightning's
    # documented switch (docs "Configure console logging"): this logger's level. fabric's, where only it is imported.
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


class _DropRecords(logging.Filter):
    """Drops the records of its logger whose message starts with one of `starts`."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith(self.starts)


def filter_third_party_warnings() -> None:
    """Apply :data:`THIRD_PARTY_WARNINGS`, :data:`SILENCED_RECORDS` and :data:`QUIET_LOGGERS` (idempotent)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for action, message, category, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings(action, message=message, category=category, module=module)
    starts: dict[str, tuple[str, ...]] = {}
    for name, start in SILENCED_RECORDS:
        starts[name] = (*starts.get(name, ()), start)
    for name, prefixes in starts.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _DropRecords)]:
            logger.removeFilter(old)
        logger.addFilter(_DropRecords(prefixes))


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
