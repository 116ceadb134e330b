"""Image files to uint8 RGB tensors 3 x H x W: the decoder behind every image-folder dataset
(the papers train on ImageNet's JPEGs, Krizhevsky et al. s2), with the image's size read from
its header first so that decompression bombs are refused before they are decoded, 16-bit
images reduced to their high byte, and a DataError naming the file for anything unreadable.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from canon.data.config import MAX_IMAGE_PIXELS
from canon.errors import DataError

# What PIL's format plugins raise on a bad file (UnidentifiedImageError is an OSError).
PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def decode_image_file(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Decode any image file to a uint8 RGB tensor 3 x H x W, or raise DataError.

    The header is read first (by `image_size`, else by PIL, which reads only that when it opens
    a file), and an image of more than `max_pixels` pixels (0: no limit of canon's own; PIL's,
    2 x PIL.Image.MAX_IMAGE_PIXELS, still holds) is refused before it is decoded: a
    decompression bomb's pixels never reach memory. Then torchvision.io (libjpeg-turbo,
    libwebp), the faster decoder (bench/bench_decode.py); PIL for PNGs (torchvision's libpng
    decoder crashes the process on some damaged files) and for what torchvision rejects (e.g.
    CMYK/YCCK variants, BMP, TIFF). The format is sniffed from the bytes, so a PNG
    named .JPEG decodes as the PNG it is. 16-bit samples keep their high byte (as PIL does
    for 16-bit RGB PNGs). Every format is turned upright by its EXIF orientation (torchvision
    does so for JPEG and PNG only, PIL's loaders for TIFF). A truncated file is an error, not
    a half-grey picture: that would be corrupt training data. Damage inside the data of a
    complete JPEG is not caught: libjpeg says "Corrupt JPEG data" on stderr (without the
    file's name) and returns the damaged picture, as it does under torchvision's and PIL's own
    readers.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    if not data:
        raise DataError(f"{path}: empty file (0 bytes)")
    return decode_image_bytes(data, path, max_pixels)


def decode_image_bytes(data: bytes, name: str | Path, max_pixels: int = MAX_IMAGE_PIXELS
                       ) -> torch.Tensor:
    """An image file's bytes decoded as decode_image_file decodes the file (the same checks,
    decoders and fallbacks); errors name `name` (a file, a shard member)."""
    size = image_size(data)  # PNG, JPEG, WebP: from the bytes (~3 us; PIL's header ~60 us)
    # torchvision turns JPEGs upright by their EXIF orientation, not WebPs: PIL does. PNGs go
    # to PIL too: libpng errors inside torchvision's decoder (a bad filter byte in a damaged
    # file) end the process with a segmentation fault, where PIL raises an error.
    if size is not None:
        _check_pixels(size, max_pixels, name)
        if not _webp_with_exif(data) and not data.startswith(_PNG_SIGNATURE):
            tensor = _decode_with_torchvision(data)
            if tensor is not None:
                return tensor
    # Other formats, headers image_size cannot parse, and files torchvision rejects: PIL reads
    # the header (and checks it again: its decoders read their own) and decodes. A GIF's
    # header gives one frame's size, and torchvision would decode every frame: PIL, the first.
    with _open_header(data, name) as image:
        _check_pixels(image.size, max_pixels, name)
        tensor = _decode_with_torchvision(data) if size is None and image.format != "GIF" \
            else None
        return tensor if tensor is not None else _decode_with_pil(image, name)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG frame headers (SOF0-3, 5-7, 9-11, 13-15): 0xC0-0xCF but DHT, JPG and DAC.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RST0-7, TEM: no length field


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG or WebP file's bytes (the formats
    torchvision.io decodes), without a PIL object; None for other formats and for malformed or
    cut-short headers, which PIL then reads (and reports)."""
    try:
        if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR":
            size = struct.unpack_from(">II", data, 16)
        elif data.startswith(b"\xff\xd8"):
            frame = jpeg_frame(data)
            size = None if frame is None else frame[:2]
        elif data.startswith(b"RIFF") and data[8:12] == b"WEBP":
            size = _webp_size(data)
        else:
            return None
    except (struct.error, IndexError):  # cut short
        return None
    return size if size and size[0] > 0 and size[1] > 0 else None


def jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, colour components, bits per sample) from a JPEG's first frame header,
    reached by walking the markers from SOI as libjpeg does; None where the walk fails or the
    bytes end first."""
    try:
        return _walk_to_frame(data)
    except (struct.error, IndexError):  # cut short
        return None


def _walk_to_frame(data: bytes) -> tuple[int, int, int, int] | None:
    at = 2
    while True:
        if data[at] != 0xFF:  # garbage between segments: leave it to PIL
            return None
        while data[at] == 0xFF:  # fill bytes
            at += 1
        marker = data[at]
        at += 1
        if marker in _JPEG_FRAMES:  # length, precision, height, width, components
            precision, height, width, components = struct.unpack_from(">BHHB", data, at + 2)
            return width, height, components, precision
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0x00, 0xD8, 0xD9, 0xDA):  # stuffing, SOI, EOI, SOS before any frame
            return None
        (length,) = struct.unpack_from(">H", data, at)
        if length < 2:
            return None
        at += length


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """The first chunk's: VP8 (lossy) frame size, VP8L (lossless) or VP8X (extended) canvas."""
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":  # after the 3-byte frame tag
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF  # top 2 bits: upscaling hint
    if chunk == b"VP8L" and data[20] == 0x2F:  # 14 bits each of width - 1, height - 1
        (bits,) = struct.unpack_from("<I", data, 21)
        return (bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:  # flags, 3 reserved, 24 bits each of w-1, h-1
        width, height = (int.from_bytes(data[at : at + 3], "little") + 1 for at in (24, 27))
        return width, height
    return None


def _open_header(data: bytes, path: str | Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL warns of images over half its own limit; max_pixels decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except PIL_ERRORS as error:
        raise DataError(f"{path}: {_unreadable_because(error)}") from None


def _check_pixels(size: tuple[int, int], max_pixels: int, path: str | Path) -> None:
    width, height = size
    pixels = width * height
    if max_pixels and pixels > max_pixels:
        raise DataError(
            f"{path}: {width} x {height} = {pixels:,} pixels, over the limit of "
            f"{max_pixels:,} (data.max_image_pixels; a decompression bomb?)"
        )
    # What PIL refuses when it opens a header (2 x its limit), also where image_size read it.
    pil_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    if pil_limit and pixels > pil_limit:
        raise DataError(
            f"{path}: too large to decode ({width} x {height} = {pixels:,} pixels, over PIL's "
            f"limit of {pil_limit:,}: 2 x PIL.Image.MAX_IMAGE_PIXELS)"
        )


@contextlib.contextmanager
def libjpeg_errors() -> Iterator[None]:
    """Around torchvision's decoders: a warning they raise about the data (a UserWarning) is
    an error here, not a partial image; torchvision 0.29 deprecates its decoders (they still
    work, and 0.26 must be supported too)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _decode_with_torchvision(data: bytes) -> torch.Tensor | None:
    """uint8 3 x H x W, or None where torchvision cannot decode the file (PIL may)."""
    try:
        with libjpeg_errors():
            tensor = decode_image(
                torch.frombuffer(bytearray(data), dtype=torch.uint8),
                mode=ImageReadMode.RGB,
                apply_exif_orientation=True,
            )
    except (RuntimeError, ValueError, UserWarning):
        return None
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        return None
    return _high_byte(tensor) if tensor.dtype == torch.uint16 else tensor


def _webp_with_exif(data: bytes) -> bool:
    # An extended WebP (a VP8X chunk first) flags an EXIF chunk in its first flag byte.
    return (data[8:16] == b"WEBPVP8X" and len(data) > 20 and bool(data[20] & 0x08))


def _decode_with_pil(image: Image.Image, path: str | Path) -> torch.Tensor:
    try:
        image.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES stays False)
        image = ImageOps.exif_transpose(image)  # upright, as torchvision's JPEGs and PNGs
        if image.mode == "F":  # its range (0..1? 0..255?) is anyone's guess; convert clips
            raise DataError(f"{path}: a floating-point image (PIL mode F), which canon does not "
                            "read; save it as 8- or 16-bit")
        if image.mode.startswith("I"):  # 16-bit greyscale (I;16 TIFF, I PGM): convert clips
            grey = _high_byte(torch.from_numpy(np.array(image, dtype=np.int32)))  # writable
            return grey.expand(3, -1, -1).contiguous()
        rgb = image.convert("RGB")
    except PIL_ERRORS as error:
        raise DataError(f"{path}: {_unreadable_because(error)}") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def _high_byte(image: torch.Tensor) -> torch.Tensor:
    """16-bit samples (0..65535) to uint8 by their high byte, as PIL converts 16-bit RGB."""
    return (image.to(torch.int32).clamp(0, 65535) >> 8).to(torch.uint8)


def _unreadable_because(error: Exception) -> str:
    """A reason a user can read: PIL's UnidentifiedImageError names only a BytesIO object."""
    if isinstance(error, UnidentifiedImageError):
        return "not a recognised image format (or its header is cut short)"
    if isinstance(error, Image.DecompressionBombError):
        return f"too large to decode ({error})"
    text = str(error) or type(error).__name__
    return f"truncated ({text})" if "truncated" in text.lower() else f"corrupt image ({text})"
