"""Shrink a CUDA library to one GPU architecture, so that onnxruntime-gpu fits the lent machine's
64 MiB transfer: the payloads of the `.nv_fatbin` entries built for other architectures are
zeroed (same size and layout, so the library loads as before; zeros compress to nothing). The
CUDA runtime loads the entry matching the GPU, which is kept.

    python -m benchmarks.device.strip_fatbin LIB OUT 90   # keep sm_90 (H100/H200) only
"""

from __future__ import annotations

import struct
import sys
from collections import Counter
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50


def _section(elf: bytes, wanted: str) -> tuple[int, int]:
    """Offset and size of the ELF64 section `wanted`."""
    (table,) = struct.unpack_from("<Q", elf, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", elf, table + i * entry_size) for i in range(count)]
    names = headers[names_index][4]
    for header in headers:
        start = names + header[0]
        if elf[start : elf.index(b"\0", start)].decode() == wanted:
            return header[4], header[5]
    raise SystemExit(f"no {wanted} section")


def strip(elf: bytearray, keep: set[int]) -> Counter[int]:
    """Zero every fatbin entry whose SM version is not in `keep`; bytes per SM version seen."""
    offset, size = _section(elf, ".nv_fatbin")
    seen: Counter[int] = Counter()
    at, end = offset, offset + size
    while at < end:
        magic, _, header_size, body_size = struct.unpack_from("<IHHQ", elf, at)
        if magic != FATBIN_MAGIC:  # alignment padding between fatbins
            at += 8
            continue
        entry, last = at + header_size, at + header_size + body_size
        while entry < last:
            _, _, entry_header, payload = struct.unpack_from("<HHIQ", elf, entry)
            (sm,) = struct.unpack_from("<I", elf, entry + 28)
            seen[sm] += payload
            if sm not in keep:
                elf[entry + entry_header : entry + entry_header + payload] = bytes(payload)
            entry += entry_header + payload
        at = last
    return seen


if __name__ == "__main__":
    library = bytearray(Path(sys.argv[1]).read_bytes())
    kept = {int(sm) for sm in sys.argv[3:]}
    for sm, size in sorted(strip(library, kept).items()):
        print(f"sm_{sm}: {size / 2**20:.1f} MiB {'kept' if sm in kept else 'zeroed'}")
    Path(sys.argv[2]).write_bytes(library)
