"""What benchmarks/device carries to a lent GPU machine: the D = 1,280 artifact without its
weights (restored byte for byte from the seed) and a CUDA library shrunk to one GPU's kernels."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

from benchmarks.device import slim, strip_fatbin
from model_export.artifact import load_manifest

from .live import REPO


def test_an_artifact_travels_without_its_weights_and_comes_back_byte_for_byte(tmp_path: Path) -> None:
    shutil.copytree(REPO / "models" / "default", tmp_path / "artifact")
    slim.strip(tmp_path / "artifact", tmp_path / "carried")
    for graph in ("lensnet.fp32.onnx", "lensnet.fp16.onnx"):
        assert (tmp_path / "carried" / graph).stat().st_size < (tmp_path / "artifact" / graph).stat().st_size / 10
    slim.fill(tmp_path / "carried")
    load_manifest(tmp_path / "carried")  # every file's size and sha256 as the manifest records
    for graph in ("lensnet.fp32.onnx", "lensnet.fp16.onnx"):
        assert (tmp_path / "carried" / graph).read_bytes() == (tmp_path / "artifact" / graph).read_bytes()


def _elf_with_fatbin(fatbin: bytes) -> bytearray:
    """A minimal ELF64 image: a null section, .shstrtab and .nv_fatbin."""
    names = b"\0.shstrtab\0.nv_fatbin\0"
    body = names + fatbin
    header_at = 64 + len(body)
    sections = [
        (0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        (1, 3, 0, 0, 64, len(names), 0, 0, 1, 0),
        (11, 1, 2, 0, 64 + len(names), len(fatbin), 0, 0, 8, 0),
    ]
    elf = bytearray(b"\x7fELF" + bytes(60))
    struct.pack_into("<Q", elf, 0x28, header_at)
    struct.pack_into("<HHH", elf, 0x3A, 64, len(sections), 1)
    elf += body
    for section in sections:
        elf += struct.pack("<IIQQQQIIQQ", *section)
    return elf


def _fatbin(entries: list[tuple[int, bytes]]) -> bytes:
    """A fatbin of ELF entries (kind 2), each (sm version, payload), with 64-byte entry headers."""
    body = b""
    for sm, payload in entries:
        header = bytearray(64)
        struct.pack_into("<HHIQ", header, 0, 2, 0x0101, 64, len(payload))
        struct.pack_into("<I", header, 28, sm)
        body += bytes(header) + payload
    return struct.pack("<IHHQ", strip_fatbin.FATBIN_MAGIC, 1, 16, len(body)) + body


def test_fatbin_payloads_of_other_gpus_are_zeroed_and_the_kept_ones_untouched() -> None:
    first = _fatbin([(80, b"\x11" * 32), (90, b"\x22" * 32)])
    second = _fatbin([(120, b"\x33" * 16)])
    elf = _elf_with_fatbin(first + bytes(8) + second)  # alignment padding between fatbins
    original = bytes(elf)
    seen = strip_fatbin.strip(elf, {90})
    assert seen == {80: 32, 90: 32, 120: 16}
    assert len(elf) == len(original)
    assert b"\x22" * 32 in elf and b"\x11" not in elf and b"\x33" not in elf
