"""Captures through a real agent, as the integration tests need them."""

from __future__ import annotations

from pathlib import Path

from corepeek.dump import write_full_core
from corepeek.remote import open_capture


def capture_file(address: str, pid: int, out: Path, **options: object):  # type: ignore[no-untyped-def]
    """Pull a full core of pid into out; returns the layout message."""
    with open_capture(address, pid, **options) as core:
        write_full_core(core, out)
        return core.layout
