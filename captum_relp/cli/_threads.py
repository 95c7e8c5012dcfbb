"""``--threads``: torch's CPU thread pool sized to the cores that are free."""
from __future__ import annotations

import argparse
import os


def free_cores() -> int:
    """Cores this process may use minus the current load (1-minute average), at least 1; under
    ``torchrun`` shared among the processes of this machine (``LOCAL_WORLD_SIZE``).

    Example:
        >>> free_cores() >= 1
        True
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - no load average on this platform
        load = 0.0
    free = max(1, min(usable, int(usable - load + 0.5)))
    return max(1, free // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--threads N`` (default: :func:`free_cores`, never more than the usable cores)."""
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: usable cores minus the current load, at least 1; "
                             "more threads than free cores slows a shared machine down)")


def apply_threads(args: argparse.Namespace) -> int:
    """Set torch's intra-op threads from ``args.threads`` (or :func:`free_cores`); returns the number used.

    Example:
        >>> apply_threads(argparse.Namespace(threads=1))
        1
    """
    import torch

    threads = args.threads if getattr(args, "threads", None) else free_cores()
    torch.set_num_threads(int(threads))
    return int(threads)
