"""corepeek client: pull ELF cores of live processes from corepeek agents.

The main entry point is :func:`corepeek.remote.open_capture`, which returns a
:class:`~corepeek.remote.RemoteCore` whose ``file`` is a seekable, read-only
file object over the remote core (usable with ``elftools.elf.elffile.ELFFile``).
"""

from .errors import CaptureError
from .remote import RemoteCore, RemoteCoreFile, open_capture

__all__ = ["CaptureError", "RemoteCore", "RemoteCoreFile", "open_capture"]
