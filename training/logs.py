"""Logging for the training commands: stderr, and a log file next to the run's checkpoints."""

import logging
from pathlib import Path


def setup_logging(log_file: Path | None, rank: int = 0) -> None:
    """Log to stderr and, on rank 0, to log_file too."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if rank == 0 and log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        handlers=handlers,
        format="%(asctime)s %(levelname)s %(message)s",
        force=True,
    )
