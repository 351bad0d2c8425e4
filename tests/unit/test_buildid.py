"""GNU build-ids read by corepeek_format.buildid agree with readelf's."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from corepeek_format.buildid import build_id


def _readelf_build_id(path: Path) -> str:
    out = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True,
                         check=True).stdout
    m = re.search(r"Build ID: ([0-9a-f]+)", out)
    return m.group(1) if m else ""


def _of(path: Path) -> str:
    data = path.read_bytes()
    return build_id(lambda off, n: data[off:off + n])


@pytest.mark.parametrize("flags", [[], ["-m32"], ["-shared", "-fPIC"], ["-Wl,--build-id=md5"],
                                   ["-Wl,--build-id=0x0123456789abcdef"]])
def test_build_id_matches_readelf(tmp_path: Path, flags: list[str]) -> None:
    src = tmp_path / "x.c"
    src.write_text("int main(void) { return 0; }\n")
    out = tmp_path / "x"
    subprocess.run(["gcc", *flags, "-Wl,--build-id" if not any("build-id" in f for f in flags)
                    else "-O0", "-o", str(out), str(src)], check=True)
    expected = _readelf_build_id(out)
    assert expected and _of(out) == expected


def test_no_build_id_and_not_elf(tmp_path: Path) -> None:
    src = tmp_path / "x.c"
    src.write_text("int main(void) { return 0; }\n")
    out = tmp_path / "x"
    subprocess.run(["gcc", "-Wl,--build-id=none", "-o", str(out), str(src)], check=True)
    assert _readelf_build_id(out) == "" and _of(out) == ""
    (tmp_path / "t").write_bytes(b"\x7fELF" + b"\xff" * 10)     # truncated header
    assert _of(tmp_path / "t") == ""
    assert _of(src) == ""


def test_system_libraries() -> None:
    for lib in ("/lib/x86_64-linux-gnu/libc.so.6", "/bin/ls"):
        p = Path(lib).resolve()
        assert _of(p) == _readelf_build_id(p) != ""
