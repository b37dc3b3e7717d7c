"""Webdataset tar archives: the one header walker, the sample key of a member name, and the member writer.

`walk_tar` lists the members (name, data offset, size) by their 512-byte headers and reads only the small text
payloads asked for, seeking over images (ustar prefixes, GNU long names and pax headers; a damaged or truncated
archive raises DataError). Both indexes of a shard are built from it: our sidecar (`bioclip_fast.data.index`) and
DALI's `.idx` (`bioclip_fast.data.shards.write_dali_index`). `header_mismatch` checks that the header in front of a
payload names the member the index recorded (the batch reader's guard against a rewritten shard). `member_key` splits
a member name into sample key and extension as webdataset does; `add_member` writes one member with fixed metadata
(reproducible archives).
"""
from __future__ import annotations

import io
import os
import tarfile

from bioclip_fast.errors import DataError

MAX_TEXT_BYTES = 64 * 1024  # text members larger than this are skipped (not captions)


def tar_number(field: bytes) -> int:
    """A tar header's numeric field (octal, or GNU base-256)."""
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    s = field.split(b"\0", 1)[0].strip()
    return int(s, 8) if s else 0


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        n = int(data[pos:sp])
        rec = data[sp + 1 : pos + n - 1].decode("utf-8", "replace")
        k, _, v = rec.partition("=")
        out[k] = v
        pos += n
    return out


class _Reader:
    """pread-based reader that counts the bytes it requests (the benchmark's 'bytes read')."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.bytes_read = 0

    def read(self, n: int, off: int) -> bytes:
        b = os.pread(self.fd, n, off)
        self.bytes_read += len(b)
        return b

    def close(self):
        os.close(self.fd)


def walk_tar(path: str, want_text=lambda ext: ext.endswith("txt")):
    """Yield (member name, data offset, size, text bytes | None) for regular files, reading headers and only the
    payloads `want_text(ext)` accepts (<= MAX_TEXT_BYTES). Returns the reader's byte count via StopIteration.value."""
    r = _Reader(path)
    try:
        off = 0
        block = r.read(512, 0)
        long_name: str | None = None
        pax: dict[str, str] = {}
        zero_blocks = 0
        if 0 < len(block) < 512:
            raise DataError(f"{path}: not a tar archive ({r.size} bytes, shorter than one tar header)")
        while len(block) == 512:
            if block == b"\0" * 512:
                zero_blocks += 1
                if zero_blocks == 2:
                    break
                off += 512
                block = r.read(512, off)
                continue
            zero_blocks = 0
            try:
                chk = tar_number(block[148:156])
                size = tar_number(block[124:136])
            except ValueError:
                chk, size = -1, 0
            if chk != sum(block[:148]) + 256 + sum(block[156:]):
                raise DataError(f"{path}: damaged tar archive or not a tar (bad header at byte {off})")
            typ = block[156:157]
            name = block[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if block[257:262] == b"ustar":
                prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
                if prefix:
                    name = prefix + "/" + name
            data_off = off + 512
            padded = (size + 511) & ~511
            nxt = data_off + padded
            if nxt > r.size:
                raise DataError(f"{path}: damaged tar archive (member {name!r} runs past the end of the file; "
                                "truncated?)")
            if typ in (b"L", b"x", b"g"):  # GNU long name / pax headers: read their (small) payload
                payload = r.read(padded + 512, data_off)
                if typ == b"L":
                    long_name = payload[:size].split(b"\0", 1)[0].decode("utf-8", "replace")
                elif typ == b"x":
                    pax = _pax_records(payload[:size])
                off, block = nxt, payload[padded:]
                continue
            if long_name is not None:
                name, long_name = long_name, None
            if "path" in pax:
                name = pax["path"]
            if "size" in pax:
                size = int(pax["size"])
                padded = (size + 511) & ~511
                nxt = data_off + padded
            pax = {}
            text = None
            if typ in (b"0", b"\0", b"7"):
                base = name.rsplit("/", 1)[-1]
                dot = base.find(".")
                ext = base[dot + 1 :] if dot > 0 else ""
                if ext and size <= MAX_TEXT_BYTES and want_text(ext):
                    chunk = r.read(padded + 512, data_off)  # payload + the next header in one call
                    text = chunk[:size]
                    yield name, data_off, size, text
                    off, block = nxt, chunk[padded:]
                    continue
                yield name, data_off, size, None
            off = nxt
            block = r.read(512, off)  # seek over the payload: image bytes are never read
        return r.bytes_read
    finally:
        r.close()


def header_mismatch(block, name: str, size: int) -> str | None:
    """Why the 512-byte tar header `block` is not that of member `name` holding `size` bytes; None when it is.

    Name (ustar prefix joined) and size fields only: a few slices, no checksum sum. A name longer than the 100-byte
    field (GNU long-name / pax records in front of the header) is compared as far as the field holds it."""
    block = bytes(block)
    if len(block) != 512:
        return "no tar header there"
    got = block[0:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            got = prefix + b"/" + got
    want = name.encode("utf-8", "surrogateescape")
    # pax headers carry non-ASCII names; the ustar field then holds a lossy copy: such members are checked by size
    if got != want and want.isascii() and not (len(want) >= 100 and len(got) >= 90 and want.startswith(got)):
        return f"the tar member there is {got.decode('utf-8', 'replace')!r}, the index names {name!r}"
    try:
        got_size = tar_number(block[124:136])
    except ValueError:
        return f"the tar header of {name!r} is damaged"
    if got_size != size:
        return f"member {name!r} holds {got_size} bytes, the index says {size}"
    return None


def member_key(name: str) -> tuple[str, str] | None:
    """(sample key, extension) of a member name, split at the first dot of the basename as webdataset does
    (`a/b.sci.txt` -> (`a/b`, `sci.txt`)); None for hidden or extension-less files, which are not samples."""
    base = name.rsplit("/", 1)[-1]
    dot = base.find(".")
    if dot <= 0:
        return None
    return name[: len(name) - len(base)] + base[:dot], base[dot + 1 :]


def tar_samples(path: str | os.PathLike) -> list[tuple[str, list[tuple[str, int, int, str]]]]:
    """[(key, [(ext, data offset, size, member name), ...]), ...] in archive order, from the headers alone (what
    DALI's `wds2idx` records). Raises DataError for a damaged archive."""
    samples: list[tuple[str, list[tuple[str, int, int, str]]]] = []
    walk = walk_tar(os.fspath(path), want_text=lambda ext: False)
    for name, off, size, _ in walk:
        split = member_key(name)
        if split is None:
            continue
        key, ext = split
        if not samples or samples[-1][0] != key:
            samples.append((key, []))
        samples[-1][1].append((ext, off, size, name))
    return samples


def add_member(tf: tarfile.TarFile, name: str, data: bytes, *, mtime: int = 0) -> None:
    """Append a regular file `name` holding `data` (mode 0644; `mtime` 0 by default: same input, same bytes)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))
