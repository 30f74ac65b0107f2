"""Reading one study file into a grey image plus what its header says.

The seam: :func:`read_study` recognises a file by its content (PNG and JPEG signatures, the
DICOM preamble or a DICOM parse), never by its name, and dispatches to the reader for that
kind. Every reader returns a :class:`~cxr_batch.study.StudyImage` or raises
:class:`~cxr_batch.study.SkipStudy` (deliberately not scored, e.g. a lateral view) or
:class:`~cxr_batch.study.ReadError` (could not be read), each with a reason a person
understands.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import warnings
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from .greyscale import to_uint8
from . import acquisition
from .study import ReadError, ScoringRules, SkipStudy, StudyHeader, StudyImage, check_image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic"}

log = logging.getLogger("cxr_batch")


def image_stem(name: str) -> str:
    """A file name without its image extension (any case: ``a.PNG`` -> ``a``), the name an image
    keeps when exported to another format. A name without one is kept whole: a DICOM file named
    by its SOP Instance UID (``1.2.826.0.1.100.2``) has no extension, its last dot is the UID's."""
    path = PurePosixPath(str(name).replace("\\", "/"))
    return path.stem if path.suffix.lower() in IMAGE_SUFFIXES else path.name


def sniff(head: bytes) -> str | None:
    """Name the kind of a file from its first 132 bytes: 'png', 'jpeg', 'dicom' or None."""
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(JPEG_SIGNATURE):
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    return None


def content_kind(path: Path) -> str | None:
    """'png', 'jpeg' or 'dicom' (with or without the preamble) by the file's content, whatever
    its name; None for anything else, or a file that cannot be opened (its read says why later)."""
    try:
        with open_regular(path) as f:  # a FIFO swapped in since the listing must not block the scan
            head = f.read(132)
            kind = sniff(head)
            if kind is not None or len(head) < 8:
                return kind
            from . import dicom

            # through the open file, not the name: a FIFO swapped in since must not block either
            return "dicom" if dicom.looks_like_dicom(pinned(path, f)) else None
    except (OSError, ReadError):
        return None


def read_pil(path: Path, rules: ScoringRules, min_side: int = 0, kind: str | None = None) -> np.ndarray:
    """Decode a PNG/JPEG to a uint8 grey array, refusing oversized and colour images. A JPEG
    is decoded through its DCT scaling (1/2, 1/4, 1/8) when a short side of ``min_side`` is
    all the caller needs. ``kind``: what the content was sniffed as, for messages."""
    return read_pil_study(path, rules, min_side, kind).grey


def read_pil_study(path: Path, rules: ScoringRules, min_side: int = 0, kind: str | None = None) -> StudyImage:
    """:func:`read_pil` with what the file says about itself: its own size and bit depth
    (before any reduced decode), for drift monitoring."""
    what = {"png": "PNG", "jpeg": "JPEG"}.get(kind) or ("PNG" if Path(path).suffix.lower() == ".png" else "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                what = im.format or what
                w, h = im.size
                made = StudyHeader(acquisition=acquisition.from_pil(kind or what.lower(), (w, h), im.mode))
                if w * h > rules.max_pixels:
                    raise ReadError(f"image is {w} x {h} pixels, over the limit of {rules.max_pixels:,}")
                if im.format == "JPEG" and min_side > 0 and im.mode in ("L", "RGB", "YCbCr"):
                    from .dicom import reduction

                    k = reduction(h, w, min_side, 3)
                    if k:
                        im.draft(im.mode, (-(-w // 2 ** k), -(-h // 2 ** k)))
                im.load()
                if im.format == "PNG" and not png_has_end(path):
                    # Pillow decodes a PNG without its IEND chunk: a copy that paused before its
                    # last 12 bytes was scored, and the whole file scored again as another study
                    raise ReadError("truncated PNG image (no IEND chunk)")
                return StudyImage(grey=pil_to_grey(im), kind=kind or what.lower(), header=made)
    except ReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ReadError(f"refused as a decompression bomb (over {Image.MAX_IMAGE_PIXELS:,} pixels)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL's errors for truncated/corrupt files
        log.debug("%s: %s", type(e).__name__, e)
        raise ReadError(f"corrupt or truncated {what} image") from None


def png_has_end(path: Path) -> bool:
    """Whether a PNG file's chunks, followed by their lengths from the signature on, reach an
    IEND chunk (what follows it is ignored, as by every reader)."""
    with open_regular(path) as f:
        pos = 8
        while len(head := os.pread(f.fileno(), 8, pos)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                return True
            pos += 12 + length
    return False


def pil_to_grey(im: Image.Image) -> np.ndarray:
    if im.mode == "L":
        return np.asarray(im, dtype=np.uint8)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        return to_uint8(np.asarray(im).astype(np.int32))
    if im.mode == "LA":
        return np.asarray(im.getchannel("L"), dtype=np.uint8)
    if im.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
        rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
        spread = np.abs(rgb - rgb.mean(axis=2, keepdims=True)).max()
        if spread > 8:  # grey content saved as RGB is fine; real colour is not a radiograph
            raise ReadError(f"colour image ({im.mode}); a radiograph is grey")
        return rgb[..., 0].astype(np.uint8)
    if im.mode == "1":
        raise ReadError("1-bit image; a radiograph needs grey levels")
    return to_uint8(np.asarray(im.convert("F")))


def is_text(head: bytes) -> bool:
    """True for content that reads as text (a README, a JSON file without its image, a log):
    valid UTF-8 without NUL bytes, almost all printable."""
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a multi-byte character cut at the end of the sample is fine
        if e.start < len(head) - 4:
            return False
        text = head[:e.start].decode("utf-8")
    printable = sum(ch.isprintable() or ch in "\t\r\n" for ch in text)
    return printable >= 0.95 * max(1, len(text))


def open_regular(path: Path):
    """Open ``path`` for reading if it is a regular file. A FIFO, device or socket (perhaps
    behind a link) is refused without blocking: opening a FIFO for reading would wait forever
    for a writer."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ReadError("not a regular file (a pipe, device or socket): not read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# Formats an export or a digitiser may leave beside the studies, by their first bytes
OTHER_FORMATS = ((b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"GIF8", "a GIF image"),
                 (b"%PDF-", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"), (b"\x1f\x8b", "a gzip archive"))


def other_format(head: bytes) -> str:
    """What a file that is not read is, from its first bytes ("a TIFF image"), or ""."""
    if head[:2] == b"BM" and len(head) >= 10 and head[6:10] == bytes(4):  # BMP: its reserved fields are zero
        return "a BMP image"
    return next((name for magic, name in OTHER_FORMATS if head.startswith(magic)), "")


def read_study(path: Path, rules: ScoringRules = ScoringRules(), min_side: int = 0,
               identity: tuple[int, int] | None = None) -> StudyImage:
    """Read one file, recognised by its content whatever its name. Raises ReadError or
    SkipStudy with the reason for its row. ``min_side`` > 0: the image may come back smaller,
    down to that short side, where its coding gives a smaller size for free. ``identity``:
    the (device, inode) the file had when it was listed; a file replaced or re-linked since (a
    link swapped to point out of the folder, say) is not read. The decoders then read the file
    that was checked, not whatever the path names by then."""
    path = Path(path)
    try:
        f = open_regular(path)
    except OSError as e:
        raise ReadError(f"cannot read file: {e.strerror or type(e).__name__}") from None
    with f:
        try:
            st = os.fstat(f.fileno())
            head = f.read(4096)
        except OSError as e:
            raise ReadError(f"cannot read file: {e.strerror or type(e).__name__}") from None
        if identity is not None and (st.st_dev, st.st_ino) != tuple(identity):
            raise ReadError("the file was replaced or re-linked between listing and reading: not read")
        if st.st_size == 0:
            raise ReadError("empty file (0 bytes)")
        if st.st_size > rules.max_file_bytes:
            raise ReadError(f"file is {st.st_size:,} bytes, over the limit of {rules.max_file_bytes:,}")
        source = pinned(path, f)
        kind = sniff(head)
        if kind in ("png", "jpeg"):
            return check_image(read_pil_study(source, rules, min_side, kind))
        from . import dicom  # pydicom is only imported when a DICOM file is met

        if kind == "dicom" or dicom.looks_like_dicom(source):
            return check_image(dicom.read_dicom(source, rules, min_side))
    other = other_format(head)
    if other:  # a format that is not read, said as such: not taken for a broken file
        raise ReadError(f"{other}: only PNG, JPEG and DICOM files are read"
                        + ("; convert it to PNG to have it scored" if other.endswith("image") else ""))
    if is_text(head):
        raise SkipStudy("not an image: a text file")
    named = f" (named {path.suffix.lower()})" if path.suffix.lower() in IMAGE_SUFFIXES else ""
    raise ReadError(f"unrecognised content: not a PNG, JPEG or DICOM file{named}")


def pinned(path: Path, f) -> Path:
    """A path that names the open file ``f`` itself (Linux: /proc/self/fd/N), so that decoders
    that open by path read the file that was checked; elsewhere ``path``."""
    fd_path = Path(f"/proc/self/fd/{f.fileno()}")
    return fd_path if fd_path.exists() else path
