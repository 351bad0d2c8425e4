"""``corepeek dump --with-files``, ``mount`` and ``debug``: a remote process
with the files it maps, for a debugger anywhere (docs/debugging.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .cliargs import freeze_mode_args, resolve_target, tls_options
from .errors import CaptureError
from .textsafe import safe

EXIT_OK, EXIT_ERROR = 0, 1


def dump_with_files(args: argparse.Namespace) -> int:
    """dump --with-files -o DIR: core, sysroot of mapped files, gdbinit/lldbinit."""
    from .bundle import write_bundle
    from .dump import write_full_core
    from .files import FileCache
    from .partial import write_partial_core
    from .remote import open_capture

    if args.only == "notes":
        raise CaptureError("--with-files needs a full or stacks capture (--only)")
    out = Path(args.output or f"core.{args.pid}.d")
    with open_capture(args.agent, args.pid, tls=tls_options(args), start_time=args.start_time,
                      mode=args.only, freeze_timeout_ms=args.freeze_timeout_ms,
                      stack_bytes=args.stack_bytes, snapshot=args.snapshot,
                      compression=args.wire_compression, wait_exclusive=args.wait) as core:
        writer = write_full_core if args.only == "full" else write_partial_core
        cache = FileCache()
        result = write_bundle(core, out, lambda c, p: writer(c, p), cache)
        lay, stats = core.layout, core.stats
    if not args.quiet:
        print(f"wrote {result.path}/: core of pid {lay.pid} ({safe(lay.comm)}), {result.files} "
              f"mapped files in root/ ({result.fetched} fetched, {result.file_bytes} bytes; "
              f"{result.files - result.fetched} from the cache), {stats.data_bytes} bytes "
              f"of core transferred; debug with: gdb -x {result.path}/gdbinit",
              file=sys.stderr)
        if result.missing:
            print(f"warning: not served by the agent: {', '.join(map(safe, result.missing))}",
                  file=sys.stderr)
    return EXIT_OK


def _mount(args: argparse.Namespace) -> int:
    from .files import FileCache
    from .mount import mount
    from .remote import open_capture

    resolve_target(args)
    mnt = Path(args.mountpoint)
    if not mnt.is_dir():
        raise CaptureError(f"{mnt} is not a directory")
    with open_capture(args.agent, args.pid, tls=tls_options(args), start_time=args.start_time,
                      mode=args.only, freeze_timeout_ms=args.freeze_timeout_ms,
                      snapshot=args.snapshot) as core:
        if not args.quiet:
            print(f"mounted pid {args.pid} ({core.layout.comm}) at {mnt}: gdb -x {mnt}/gdbinit; "
                  f"unmount with fusermount3 -u {mnt}", file=sys.stderr)
        fs = mount(core, mnt, cache=FileCache(), readahead=args.readahead)
        stats = core.stats
    if not args.quiet:
        print(f"unmounted: {stats.data_bytes} bytes of core and {stats.file_bytes} bytes of "
              f"files fetched in {stats.requests} requests; the target runs"
              + (f" (reads failed: {fs.failed})" if fs.failed else ""), file=sys.stderr)
    return EXIT_ERROR if fs.failed else EXIT_OK


def _debug(args: argparse.Namespace) -> int:
    from .debugrun import run_debug

    resolve_target(args)
    argv = ["--agent", args.agent, "--timeout", str(args.timeout),
            "--start-time", str(args.start_time), "--only", args.only]
    for name in ("tls_ca", "tls_cert", "tls_key", "tls_server_name"):
        if getattr(args, name):
            argv += ["--" + name.replace("_", "-"), getattr(args, name)]
    if args.snapshot is not None:
        argv.append("--snapshot" if args.snapshot else "--live")
    argv.append(str(args.pid))       # last: the mount point follows it (two positionals)
    extra = args.debugger_args[1:] if args.debugger_args[:1] == ["--"] else args.debugger_args
    return run_debug(argv, args.debugger, extra)


def add_mount_parsers(add: Callable[..., argparse.ArgumentParser],
                      capture_args: Callable[[argparse.ArgumentParser], None]) -> None:
    from .mount import DEFAULT_READAHEAD

    m = add("mount", help="a live process as a directory: core, root/, gdbinit (FUSE)")
    capture_args(m)
    m.add_argument("mountpoint", help="an empty directory to mount on")
    m.add_argument("--only", choices=("full", "stacks"), default="full",
                   help="full core, or notes + stacks only (default full)")
    freeze_mode_args(m)
    m.add_argument("--readahead", type=int, default=DEFAULT_READAHEAD,
                   help=f"bytes fetched per core miss (default {DEFAULT_READAHEAD})")
    m.set_defaults(func=_mount)

    g = add("debug", help="mount privately, run a debugger on it, unmount")
    capture_args(g)
    g.add_argument("--debugger", choices=("gdb", "lldb", "drgn"), default="gdb",
                   help="the debugger to run on the mount (default gdb)")
    g.add_argument("--only", choices=("full", "stacks"), default="full",
                   help="full core, or notes + stacks only (default full)")
    freeze_mode_args(g)
    g.add_argument("debugger_args", nargs=argparse.REMAINDER,
                   help="-- then arguments for the debugger")
    g.set_defaults(func=_debug)
