"""corepeek client: pull ELF cores of live processes from corepeek agents.

The main entry point is :func:`corepeek.remote.open_capture`, which returns a
:class:`~corepeek.remote.RemoteCore` whose ``file`` is a seekable, read-only
file object over the remote core (usable with ``elftools.elf.elffile.ELFFile``).

The names below load on first use (PEP 562), so importing the generated stubs
(``corepeek.v1``), as the agent does, does not load the client library.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import CaptureError
    from .remote import RemoteCore, RemoteCoreFile, open_capture

__all__ = ["CaptureError", "RemoteCore", "RemoteCoreFile", "open_capture"]

_WHERE = {"CaptureError": ".errors", "RemoteCore": ".remote", "RemoteCoreFile": ".remote",
          "open_capture": ".remote"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
