"""Atomic outputs, escaped remote strings and the CLI's target selection, without an agent."""

from __future__ import annotations

import argparse
import os
import socket
import stat
from pathlib import Path

import pytest

from corepeek.cli import build_parser
from corepeek.errors import CaptureError
from corepeek.outfile import AtomicOutput
from corepeek.targeting import (AmbiguousTarget, UsageError, pick_process, process_table,
                                resolve_agent)
from corepeek.textsafe import safe
from corepeek.v1 import capture_pb2 as pb

# -- textsafe ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw, shown", [
    ("nginx", "nginx"),
    ("x\n\x1b[2Jy", "x\\n\\x1b[2Jy"),
    ("a\rb\tc", "a\\rb\\tc"),
    ("del\x7f", "del\\x7f"),
    ("c1\x9bm", "c1\\x9bm"),                       # 8-bit CSI
    ("back\\slash", "back\\\\slash"),              # a literal backslash is never ambiguous
    ("line\u2028sep\u202eRLO", "line\\u2028sep\\u202eRLO"),
    ("/opt/caf\u00e9/bin", "/opt/caf\u00e9/bin"),  # printable non-ASCII stays
])
def test_safe_escapes_control_characters_only(raw: str, shown: str) -> None:
    assert safe(raw) == shown


def test_safe_output_has_no_control_character_left() -> None:
    every = "".join(chr(c) for c in range(0x2100))
    out = safe(every)
    assert not [c for c in out if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F], out[:200]
    assert "\n" not in out and "\x1b" not in out


# -- atomic outputs -----------------------------------------------------------------------

def _names(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


def test_commit_renames_a_new_0600_file_into_place(tmp_path: Path) -> None:
    dest = tmp_path / "core"
    old = os.umask(0)                               # a permissive umask changes nothing
    try:
        with AtomicOutput(dest) as out:
            os.write(out.fd, b"ELF")
            assert not dest.exists(), "the name exists before the file is complete"
            [tmp] = _names(tmp_path)
            assert tmp.startswith(".core.") and tmp.endswith(".tmp")
            out.commit()
    finally:
        os.umask(old)
    assert dest.read_bytes() == b"ELF" and _names(tmp_path) == {"core"}
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600


def test_an_exception_removes_the_file(tmp_path: Path) -> None:
    dest = tmp_path / "core"
    dest.write_bytes(b"the previous core")
    with pytest.raises(RuntimeError), AtomicOutput(dest) as out:
        os.write(out.fd, b"half")
        raise RuntimeError("cut")
    assert _names(tmp_path) == {"core"} and dest.read_bytes() == b"the previous core"


def test_keep_partial_renames_to_dot_partial(tmp_path: Path) -> None:
    dest = tmp_path / "core"
    out = AtomicOutput(dest, keep_partial=True)
    os.write(out.fd, b"half")
    kept = out.abort()
    assert kept == tmp_path / "core.partial" and kept.read_bytes() == b"half"
    assert _names(tmp_path) == {"core.partial"}
    assert out.abort() == kept                      # idempotent


def test_a_planted_symlink_is_replaced_never_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"root only")
    secret.chmod(0o600)
    link = tmp_path / "core"
    link.symlink_to(secret)
    with AtomicOutput(link) as out:
        os.write(out.fd, b"core")
        out.commit()
    assert secret.read_bytes() == b"root only" and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert not link.is_symlink() and link.read_bytes() == b"core"


def test_an_existing_file_does_not_lend_its_mode(tmp_path: Path) -> None:
    dest = tmp_path / "core"
    dest.write_bytes(b"old")
    dest.chmod(0o644)
    with AtomicOutput(dest) as out:
        out.commit()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600


def test_bad_destinations_fail_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="is a directory"):
        AtomicOutput(tmp_path)
    with pytest.raises(CaptureError, match="cannot create a file in"):
        AtomicOutput(tmp_path / "no-such-dir" / "core")
    assert _names(tmp_path) == set()


# -- agent defaults and name-based selection -------------------------------------------------

def test_agent_comes_from_the_flag_then_the_environment_then_the_local_socket(
        tmp_path: Path) -> None:
    sock_path = tmp_path / "corepeek.sock"
    env = {"COREPEEK_AGENT": "10.0.0.1:7443"}
    assert resolve_agent("unix:/x", env, str(sock_path)) == "unix:/x"
    assert resolve_agent(None, env, str(sock_path)) == "10.0.0.1:7443"
    with pytest.raises(UsageError, match="COREPEEK_AGENT"):
        resolve_agent(None, {}, str(sock_path))
    sock_path.write_text("")                        # not a socket: not an agent
    with pytest.raises(UsageError):
        resolve_agent(None, {}, str(sock_path))
    sock_path.unlink()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        assert resolve_agent(None, {}, str(sock_path)) == f"unix:{sock_path}"


def _proc(pid: int, comm: str, exe: str = "/bin/x") -> pb.ProcessInfo:
    return pb.ProcessInfo(pid=pid, comm=comm, exe=exe, start_time=1000 + pid)


def test_pick_process_one_none_several() -> None:
    assert pick_process([_proc(7, "redis")], "redis", "", "a").pid == 7
    with pytest.raises(CaptureError, match="no process matches --comm 'redis' on a") as e:
        pick_process([], "redis", "", "a")
    assert not isinstance(e.value, UsageError)
    with pytest.raises(AmbiguousTarget) as amb:
        pick_process([_proc(7, "redis"), _proc(9, "redis", "/srv/\nforged 1 2 3")],
                     "redis", "/srv/*", "a")
    text = str(amb.value)
    assert "2 processes match --comm 'redis' --exe '/srv/*'" in text
    assert "1007" in text and "1009" in text and "/srv/\\nforged" in text
    assert len(text.splitlines()) == 4                # header + table header + 2 rows


def test_process_table_escapes_names() -> None:
    table = process_table([_proc(1, "x\n\x1b[2Jy")])
    assert "\x1b" not in table and len(table.splitlines()) == 2


# -- the parser ----------------------------------------------------------------------------------

def _walk(parser: argparse.ArgumentParser, path: str):  # type: ignore[no-untyped-def]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_option_of_every_subcommand_has_help() -> None:
    missing = [f"{path}: {'/'.join(a.option_strings) or a.dest}"
               for path, a in _walk(build_parser(), "corepeek")
               if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, f"options without a help line: {missing}"
    # the walk really visits the subcommands
    assert sum(1 for path, _ in _walk(build_parser(), "corepeek") if path.endswith(" dump")) > 10


@pytest.mark.parametrize("argv", [
    ["-q", "-v", "dump", "--agent", "a", "1"],
    ["dump", "--agent", "a", "1", "-q", "-v"],
    ["dump", "-qv", "--agent", "a", "1"],
    ["-q", "dump", "-v", "--agent", "a", "1"],
])
def test_global_flags_before_or_after_the_subcommand(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.quiet, args.verbose, args.pid) == (True, 1, 1)


def test_global_flag_defaults_survive_a_subcommand() -> None:
    args = build_parser().parse_args(["ps", "--agent", "a"])
    assert (args.quiet, args.verbose) == (False, 0)
    args = build_parser().parse_args(["collect", "--agents", "a", "--all", "-q"])
    assert args.quiet is True
