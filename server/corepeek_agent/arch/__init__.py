"""Architecture knowledge behind one small interface (:class:`ArchSpec`).

Adding an architecture means adding one module that defines an ``ArchSpec``
and registering it in :data:`ARCHES`; see docs/architectures.md.
"""

from __future__ import annotations

from .base import ArchSpec, RegsetNote
from .i386 import I386
from .x86_64 import X86_64

ARCHES: dict[str, ArchSpec] = {a.name: a for a in (X86_64, I386)}

__all__ = ["ARCHES", "ArchSpec", "RegsetNote", "I386", "X86_64"]
