"""fedseg's log lines where people look: the CLI's terminal, the coordinator's ``flwr run --stream``
(Flower mirrors a ServerApp's stdout to it) and each SuperNode's output."""

from __future__ import annotations

import logging
import os
import sys
import warnings

FORMAT = "%(asctime)s fedseg %(message)s"


def setup_logging(quiet_flower: bool = True) -> None:
    """fedseg's progress on stdout (once per process); with ``quiet_flower`` Flower's own log only
    from warnings up (the CLI prints its own per-round progress)."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    root = logging.getLogger("fedseg")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    # MONAI builds its DICOM reader with every image loader and says, in its log and as a warning,
    # that a GPU codec is missing: nothing a user can act on, and pydicom decodes without it
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
    if quiet_flower:
        flwr_log = logging.getLogger("flwr")
        flwr_log.propagate = False
        flwr_log.filters[:] = [_quiet_flower]


def _quiet_flower(record: logging.LogRecord) -> bool:
    # `fedseg simulate` is the supported entry point, so Flower's notice about run_simulation
    # being deprecated is noise here
    return record.levelno >= logging.WARNING and "DEPRECATED FEATURE" not in str(record.msg)
