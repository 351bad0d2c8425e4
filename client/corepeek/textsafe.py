"""Remote strings made safe for a terminal.

Every name the agent reports -- comm, exe, command line, thread names, mapped
file paths -- is chosen by the target process (``prctl(PR_SET_NAME)``, a
file name with a newline in it).  Printed raw, an ``ESC [2J`` clears the
operator's screen and a newline forges a line of ``ps`` output.  Human
output therefore passes each of them through :func:`safe`; ``--json`` output
stays exact (JSON escapes control characters itself).
"""

from __future__ import annotations

import re

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
# C0 controls, DEL, C1 controls, and the backslash (so an escape is never
# ambiguous with a literal one).  Unicode line/paragraph separators and bidi
# overrides reorder or break lines on many terminals: escaped as well.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\\\\\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    ch = m.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def safe(text: object) -> str:
    """``text`` with every control character shown as an escape (``\\n``, ``\\x1b``)."""
    s = text if isinstance(text, str) else str(text)
    return _UNSAFE.sub(_escape, s)
