"""Pure helpers of the benchmark (bench/run.py): statistics, /proc parsing, tables.

Kept free of I/O so tests/unit/test_bench.py can check them.
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

MIB = 1024 * 1024


def use_this_checkout() -> None:
    """Import this checkout's ``client/`` and ``server/`` (and the test
    harness), here and in every subprocess (through PYTHONPATH), whatever an
    editable install elsewhere (a CI clone) points at."""
    root = Path(__file__).resolve().parent.parent
    code = [str(root / "client"), str(root / "server")]
    sys.path[:0] = [str(root / "tests"), *code]
    os.environ["PYTHONPATH"] = os.pathsep.join(
        code + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None (None if there are none)."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def medians(runs: Sequence[Mapping[str, object]]) -> dict[str, float | None]:
    """Per-key median of the numeric fields of several runs."""
    keys: list[str] = []
    for r in runs:
        keys += [k for k, v in r.items() if k not in keys and isinstance(v, (int, float))
                 and not isinstance(v, bool)]
    return {k: median(r.get(k) for r in runs) for k in keys}  # type: ignore[misc]


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) through (x, y) points (at least two x values)."""
    xs = [p[0] for p in points]
    if len(set(xs)) < 2:
        raise ValueError("need at least two distinct x values to fit a line")
    mx = sum(xs) / len(xs)
    my = sum(p[1] for p in points) / len(points)
    slope = (sum((x - mx) * (y - my) for x, y in points)
             / sum((x - mx) ** 2 for x in xs))
    return my - slope * mx, slope


def extrapolate(points: Sequence[tuple[float, float]], x: float) -> float:
    """y at x on the least-squares line through points."""
    a, b = fit_line(points)
    return a + b * x


def proc_cpu_seconds(stat_text: str, clock_ticks: int) -> float:
    """utime + stime (all threads) from the text of /proc/PID/stat."""
    fields = stat_text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / clock_ticks


def proc_status_bytes(status_text: str, field: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmHWM, VmRSS...) in bytes."""
    for line in status_text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def fmt_seconds(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 0.01:
        return f"{v * 1000:.2f}ms"
    if v < 1:
        return f"{v * 1000:.0f}ms"
    return f"{v:.2f}s"


def fmt_bytes(v: float | None) -> str:
    if v is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(v) >= size:
            return f"{v / size:.1f}{unit}" if v / size < 100 else f"{v / size:.0f}{unit}"
    return f"{v:.0f}B"


def fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "-"
    r = a / b
    return f"{r:.2f}" if r >= 0.1 else f"{r:.2g}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (readable as plain text too), columns padded."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def parse_config(spec: str) -> dict:
    """A client/agent configuration for A/B runs, from ``item+item+...``.

    Items: ``base`` (nothing changed), ``chunk=BYTES`` (max_chunk_bytes the
    client asks for; K/M suffixes allowed), ``variant=NAME`` (an agent variant
    of bench/agent_main.py), ``sopt:KEY=VALUE`` (a gRPC server option of the
    agent), ``client-no-mallopt`` (the client keeps glibc's
    malloc defaults), ``opt:KEY=VALUE`` (a gRPC channel option), ``no-writer``
    (the client writes from its receiving thread, no writer thread), ``writer``
    (a writer thread even with direct I/O; by default only without),
    ``wpiece=BYTES`` (largest single buffered pwrite of the client),
    ``no-direct`` (the client writes through the page cache only, no O_DIRECT),
    ``no-spill`` (the client waits for a free staging buffer instead of writing
    the excess through the page cache), ``legacy`` (agent
    and client transfer code as before issue 7, commit c95ae15).
    """
    cfg: dict = {"name": spec, "chunk_bytes": 0, "variants": (), "mallopt": True,
                 "options": (), "writer": None}
    for item in filter(None, spec.split("+")):
        if item == "base":
            continue
        if item == "client-no-mallopt":
            cfg["mallopt"] = False
        elif item == "no-writer":
            cfg["writer"] = False
        elif item == "writer":
            cfg["writer"] = True
        elif item in ("no-direct", "no-spill"):
            cfg[item.replace("-", "_")] = True
        elif item == "legacy":           # the whole path before issue 7
            cfg["legacy"] = True
            cfg["mallopt"] = False
            cfg["variants"] = tuple(sorted({*cfg["variants"], "legacy"}))
        elif item.startswith("wpiece="):
            cfg["write_piece"] = parse_size(item[len("wpiece="):])
        elif item.startswith("chunk="):
            cfg["chunk_bytes"] = parse_size(item[len("chunk="):])
        elif item.startswith("variant="):
            cfg["variants"] = tuple(sorted({*cfg["variants"], item[len("variant="):]}))
        elif item.startswith("sopt:") and "=" in item:
            cfg["variants"] = tuple(sorted({*cfg["variants"], item}))
        elif item.startswith("opt:") and "=" in item:
            cfg["options"] = (*cfg["options"], item[len("opt:"):])
        else:
            raise ValueError(f"unknown configuration item {item!r} in {spec!r}")
    return cfg


def parse_size(text: str) -> int:
    """``3M`` / ``256K`` / ``1048576`` -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)
