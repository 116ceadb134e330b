"""canon.data.tar_reader against tarfile: the same regular files from the formats tarfile
writes, and tarfile's errors for damaged streams."""

from __future__ import annotations

import io
import tarfile

import pytest

from canon.data.tar_reader import seek_past, tar_members

LONG = "n01440764/" + "a_file_name_longer_than_a_ustar_name_field_" * 3 + "end.JPEG"
DEEP = "/".join(["a_folder_name_of_forty_characters_______"] * 3) + "/x.JPEG"  # ustar prefix
UNICODE = "n02102040/café-ß.JPEG"


def _tar(tar_format: int, members: list[tuple[str, bytes]], directory: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        if directory:
            info = tarfile.TarInfo("n01440764")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("n01440764/link.JPEG")
        link.type, link.linkname = tarfile.SYMTYPE, "x.JPEG"
        tar.addfile(link)
    return buffer.getvalue()


def _tarfile_members(raw: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT,
                                        tarfile.USTAR_FORMAT])
def test_it_reads_the_regular_files_tarfile_reads(tar_format):
    members = [("n01440764/one.JPEG", bytes(range(256)) * 3), ("n01440764/one.cls", b"0"),
               ("n01440764/empty.JPEG", b""), (DEEP, b"\xff\xd8" * 700)]
    if tar_format != tarfile.USTAR_FORMAT:  # ustar holds neither
        members += [(LONG, b"\x00" * 512), (UNICODE, b"\x01")]
    raw = _tar(tar_format, members)
    assert list(tar_members(io.BytesIO(raw))) == _tarfile_members(raw) == members
    file = io.BytesIO(raw)
    seek_past(file, 3)
    assert list(tar_members(file)) == members[3:]


def test_a_pax_size_overrides_the_header_field():
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("big.bin")
        info.size, info.pax_headers = 3, {"size": "3", "comment": "kept apart"}
        tar.addfile(info, io.BytesIO(b"abc"))
    assert list(tar_members(io.BytesIO(raw.getvalue()))) == [("big.bin", b"abc")]


def _with_field(raw: bytes, at: int, field: bytes) -> bytes:
    """The first header of `raw` with bytes `at`... replaced by `field`, its checksum redone."""
    header = bytearray(raw[:512])
    header[at : at + len(field)] = field
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + raw[512:]


def test_damaged_streams_raise_tarfile_errors():
    raw = _tar(tarfile.PAX_FORMAT, [("a/b.JPEG", b"x" * 2000), ("a/b.cls", b"1")],
               directory=False)
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        list(tar_members(io.BytesIO(raw[:1000])))  # inside the first file's data
    with pytest.raises(tarfile.ReadError, match="in a header"):
        list(tar_members(io.BytesIO(raw[:2560 + 100])))  # inside the second header
    for at in (10, 2560 + 10):  # a byte of the first name, then of the second
        flipped = bytearray(raw)
        flipped[at] ^= 0x01
        with pytest.raises(tarfile.HeaderError, match="bad checksum"):
            list(tar_members(io.BytesIO(bytes(flipped))))
    with pytest.raises(tarfile.HeaderError, match="negative number"):
        list(tar_members(io.BytesIO(_with_field(raw, 124, b"\xff" * 12))))
    pax = io.BytesIO()
    with tarfile.open(fileobj=pax, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("big.bin")
        info.size, info.pax_headers = 3, {"size": "3x"}
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(tarfile.HeaderError, match="invalid pax size '3x'"):
        list(tar_members(io.BytesIO(pax.getvalue())))


def test_the_ends_and_numbers_tarfile_accepts():
    members = [("a/b.JPEG", b"x" * 2000)]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(members[0][0])
        info.size = 2000
        tar.addfile(info, io.BytesIO(members[0][1]))
    raw = buffer.getvalue()
    end = 512 + 2048  # the member's header and data; the end-of-archive blocks follow
    for cut in (end, end + 100, len(raw)):  # none, part of them, all of them
        assert list(tar_members(io.BytesIO(raw[:cut]))) == members
    assert list(tar_members(io.BytesIO(b""))) == []
    size = _with_field(raw, 124, b"00000003720\0")[:end] + b"\0" * 1024  # 2000, NUL-ended
    assert list(tar_members(io.BytesIO(_with_field(size, 124, b"0003720\0xyz ")))) == members
