"""Facts about the machine the merge runs on."""

from __future__ import annotations

import os


def physical_memory() -> int | None:
    """This machine's RAM in bytes, where the OS says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
