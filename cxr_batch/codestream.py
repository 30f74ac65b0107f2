"""The size a compressed frame will decode to, read from its codestream header before any
decoder allocates memory for it.

A DICOM header's Rows/Columns can lie: an 8 KB file that says 256 x 256 may carry a JPEG whose
start-of-frame says 65000 x 65000, and the decoder allocates what the codestream says. These
functions read only the first bytes of a frame (JPEG SOFn, JPEG-LS SOF55, JPEG 2000 SIZ, with
or without the JP2 box wrapper, and the RLE header) and return what it declares.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


class CodestreamError(ValueError):
    """The frame's header is missing or malformed."""


@dataclass(frozen=True)
class FrameInfo:
    rows: int
    columns: int
    components: int  # samples per pixel (RLE: segments, i.e. samples x bytes per sample)
    kind: str
    precision: int = 0  # bits per sample of the first component (JPEG 2000: from SIZ)
    signed: bool = False
    levels: int = 0  # JPEG 2000 wavelet decomposition levels (from COD): 1/2^k sizes come free


# Start-of-frame markers of ITU T.81 (baseline, extended, progressive, lossless; FFC4 DHT,
# FFC8 JPG and FFCC DAC are not frames) and SOF55 (FFF7) of JPEG-LS (ITU T.87).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
# Markers without a length field.
_STANDALONE = {0x01, *range(0xD0, 0xD8)}


def jpeg_frame(data: bytes) -> FrameInfo:
    """JPEG (T.81) or JPEG-LS (T.87) codestream -> its frame size."""
    if data[:2] != b"\xff\xd8":
        raise CodestreamError("no JPEG start-of-image marker")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise CodestreamError(f"expected a marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            break
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if length < 2:
            raise CodestreamError("JPEG segment with an invalid length")
        if marker in _SOF:
            if pos + 10 > len(data):
                break
            _precision, rows, columns, components = struct.unpack(">BHHB", data[pos + 4:pos + 10])
            return FrameInfo(rows, columns, components, "JPEG-LS" if marker == 0xF7 else "JPEG")
        pos += 2 + length
    raise CodestreamError("no JPEG frame header in the first bytes of the codestream")


def j2k_frame(data: bytes) -> FrameInfo:
    """JPEG 2000 codestream (or JP2 file) -> its image size from the SIZ marker segment."""
    if data[4:8] == b"jP  ":  # JP2 file format: boxes; the codestream is in 'jp2c'
        pos = 0
        while pos + 8 <= len(data):
            length, box = struct.unpack(">I4s", data[pos:pos + 8])
            header = 8
            if length == 1:
                if pos + 16 > len(data):
                    break
                (length,) = struct.unpack(">Q", data[pos + 8:pos + 16])
                header = 16
            if box == b"jp2c":
                return j2k_frame(data[pos + header:])
            if length < header:
                break
            pos += length
        raise CodestreamError("no JPEG 2000 codestream box in the first bytes of the JP2 file")
    if data[:4] != b"\xff\x4f\xff\x51":
        raise CodestreamError("no JPEG 2000 SOC/SIZ markers")
    if len(data) < 4 + 38:
        raise CodestreamError("JPEG 2000 SIZ segment is truncated")
    lsiz, _rsiz, xsiz, ysiz, xosiz, yosiz = struct.unpack(">HHIIII", data[4:24])
    (csiz,) = struct.unpack(">H", data[40:42])
    if xosiz > xsiz or yosiz > ysiz:
        raise CodestreamError("JPEG 2000 SIZ offsets beyond the image")
    ssiz = data[42] if len(data) > 42 else 0
    levels = 0
    cod = 4 + lsiz  # the marker segment after SIZ (Lsiz counts itself, not the marker); COD comes before any tile
    while cod + 4 <= len(data) and data[cod] == 0xFF:
        marker, (length,) = data[cod + 1], struct.unpack(">H", data[cod + 2:cod + 4])
        if marker == 0x52 and cod + 10 <= len(data):  # COD: Scod, SGcod (4 bytes), then decomposition levels
            levels = data[cod + 9]
            break
        if marker == 0x90:  # start of a tile: no COD in the main header
            break
        cod += 2 + length
    return FrameInfo(ysiz - yosiz, xsiz - xosiz, csiz, "JPEG 2000", precision=(ssiz & 0x7F) + 1,
                     signed=bool(ssiz & 0x80), levels=levels)


def rle_segments(data: bytes) -> int:
    """The number of segments an RLE Lossless frame declares (PS3.5 G.5: at most 15)."""
    if len(data) < 64:
        raise CodestreamError("RLE header is truncated")
    (segments,) = struct.unpack("<I", data[:4])
    if not 1 <= segments <= 15:
        raise CodestreamError(f"RLE header declares {segments} segments")
    return segments


def ends_with_eoi(pixel_data: bytes) -> bool:
    """Whether the last non-empty fragment of encapsulated pixel data ends with a JPEG
    end-of-image marker (FFD9): a JPEG or JPEG-LS frame cut short lacks it, and libjpeg and
    CharLS decode such a frame without a word, filling the rest. 00 and FF bytes after the
    marker are padding (one 00 to even length, PS3.5 A.4; encoders also pad with FF fill or to
    a multiple of 4), and an empty fragment may follow: neither is a cut. Looking past them is
    safe because FFD9 cannot occur inside entropy-coded data (T.81 stuffs 00 after FF, T.87
    clears the next byte's top bit), so a cut frame never ends in FFD9 plus padding."""
    pos, items, start, end = 0, 0, None, None
    while pos + 8 <= len(pixel_data):
        group, element, length = struct.unpack("<HHI", pixel_data[pos:pos + 8])
        if (group, element) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            break  # the sequence delimiter, or something malformed: judge what came before
        pos += 8
        if items > 0 and length > 0:
            start, end = pos, min(pos + length, len(pixel_data))
        pos += length
        items += 1
    if end is None:
        return False
    tail = pixel_data[max(start, end - 1024):end]  # padding is a few bytes; do not copy a whole frame
    return tail.rstrip(b"\x00\xff").endswith(b"\xff\xd9")


def first_fragment(pixel_data: bytes, limit: int = 1 << 16) -> bytes:
    """The first ``limit`` bytes of the first fragment of encapsulated pixel data (PS3.5 A.4):
    an item holding the basic offset table, then one item per fragment."""
    pos, items = 0, 0
    while pos + 8 <= len(pixel_data):
        group, element, length = struct.unpack("<HHI", pixel_data[pos:pos + 8])
        if (group, element) != (0xFFFE, 0xE000):
            raise CodestreamError("encapsulated pixel data without an item")
        pos += 8
        if items == 1:
            if length == 0xFFFFFFFF:
                raise CodestreamError("fragment of undefined length")
            return pixel_data[pos:pos + min(length, limit)]
        if length == 0xFFFFFFFF:
            raise CodestreamError("offset table of undefined length")
        pos += length
        items += 1
    raise CodestreamError("encapsulated pixel data holds no fragment")


def frame_head(pixel_data: bytes, limit: int = 1 << 16) -> bytes:
    """The first ``limit`` bytes of single-frame encapsulated pixel data, read on across its
    fragments: a frame split in small fragments (gdcmconv --split) holding a large APP or COM
    segment has its frame header in a later one. CodestreamError as :func:`first_fragment`."""
    first = first_fragment(pixel_data, limit)
    pos, items, parts, size = 0, 0, [], 0
    while pos + 8 <= len(pixel_data) and size < limit:
        group, element, length = struct.unpack("<HHI", pixel_data[pos:pos + 8])
        if (group, element) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            break  # the sequence delimiter, or something malformed: the decoder judges it
        pos += 8
        if items > 0:
            parts.append(pixel_data[pos:pos + min(length, limit - size)])
            size += len(parts[-1])
        pos += length
        items += 1
    return first if len(parts) == 1 else b"".join(parts)


def frame_bytes(pixel_data: bytes) -> bytes:
    """The whole frame of single-frame encapsulated pixel data: every fragment after the basic
    offset table, joined (PS3.5 A.4; one fragment is returned without a copy of its items)."""
    pos, items, fragments = 0, 0, []
    while pos + 8 <= len(pixel_data):
        group, element, length = struct.unpack("<HHI", pixel_data[pos:pos + 8])
        if (group, element) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            break  # the sequence delimiter, or something malformed: the decoder judges it
        pos += 8
        if items > 0:
            fragments.append(pixel_data[pos:pos + length])
        pos += length
        items += 1
    return fragments[0] if len(fragments) == 1 else b"".join(fragments)


def check_j2k_tile_parts(data: bytes) -> None:
    """Raise CodestreamError unless the tile-parts of a JPEG 2000 codestream (or JP2 file) fill
    it exactly: each SOT's tile-part length (Psot) leads to the next SOT, and the last to the
    end-of-codestream marker (FFD9) at the end, 00 padding aside. A lost or repeated fragment
    breaks the chain; a cut or zeroed end loses EOC, and openjpeg decodes such a codestream
    without an error, filling what is missing."""
    if data[4:8] == b"jP  ":
        pos = 0
        while pos + 8 <= len(data):
            length, box = struct.unpack(">I4s", data[pos:pos + 8])
            header = 8
            if length == 1 and pos + 16 <= len(data):
                (length,) = struct.unpack(">Q", data[pos + 8:pos + 16])
                header = 16
            if box == b"jp2c":  # the last box may run to the end of the file (length 0)
                return check_j2k_tile_parts(data[pos + header:pos + length if length else len(data)])
            if length < header:
                break
            pos += length
        raise CodestreamError("JP2 file without a codestream box")
    tail = data[-1024:]  # a 00 pads the frame to even length (PS3.5 A.4): a few bytes, not a copy of it all
    end = len(data) - len(tail) + len(tail.rstrip(b"\x00"))
    pos = 2  # after SOC: the main header's marker segments, up to the first tile-part
    while pos + 4 <= end and data[pos] == 0xFF and data[pos + 1] != 0x90:
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        pos += 2 + length
    tile_parts = 0
    parts: dict[int, list[int]] = {}  # tile index (Isot) -> [tile-parts seen, tile-parts it declares (TNsot)]
    while pos + 12 <= end and data[pos:pos + 2] == b"\xff\x90":
        isot, psot, _tpsot, tnsot = struct.unpack(">HIBB", data[pos + 4:pos + 12])
        seen = parts.setdefault(isot, [0, 0])
        seen[0] += 1
        seen[1] = seen[1] or tnsot  # TNsot may be 0 (unknown) in all but one of a tile's tile-parts
        tile_parts += 1
        if psot == 0:  # the last tile-part, running to EOC
            pos = end - 2
            break
        pos += psot
    if tile_parts == 0:
        raise CodestreamError("no tile-part after its main header")
    if pos != end - 2 or data[pos:pos + 2] != b"\xff\xd9":
        raise CodestreamError("its tile-part lengths do not end at its end-of-codestream marker: bytes cut, lost "
                              "or zeroed")
    # Whole tile-parts dropped keep the chain intact: openjpeg decodes the tiles that are missing
    # as black, and so does a SIZ enlarged beyond the coded tiles (with Rows/Columns lying to
    # match). Every tile of SIZ's grid must be there, with every tile-part it declares.
    tiles = _j2k_tile_count(data)
    missing = tiles - sum(1 for i in parts if i < tiles)
    if missing or len(parts) != tiles:
        raise CodestreamError(f"its image has {tiles} tiles of which {missing} {'is' if missing == 1 else 'are'} missing" if missing else
                              f"it holds tiles beyond the {tiles} of its image")
    short = [i for i, (seen, declared) in parts.items() if declared and seen != declared]
    if short:
        raise CodestreamError(f"tile {short[0]} has {parts[short[0]][0]} of its {parts[short[0]][1]} tile-parts")


def _j2k_tile_count(data: bytes) -> int:
    """How many tiles the SIZ of a codestream (not a JP2 file) divides its image into."""
    if len(data) < 4 + 38 or data[:4] != b"\xff\x4f\xff\x51":
        raise CodestreamError("no JPEG 2000 SOC/SIZ markers")
    xsiz, ysiz, _xosiz, _yosiz, xtsiz, ytsiz, xtosiz, ytosiz = struct.unpack(">IIIIIIII", data[8:40])
    if xtsiz == 0 or ytsiz == 0 or xtosiz >= xsiz or ytosiz >= ysiz:
        raise CodestreamError("JPEG 2000 SIZ declares an invalid tile grid")
    return -(-(xsiz - xtosiz) // xtsiz) * -(-(ysiz - ytosiz) // ytsiz)


# Lossless JPEG processes (SOF3, SOF7, SOF11, SOF15): a data unit is one sample, not an 8 x 8 block.
_LOSSLESS_SOF = {0xC3, 0xC7, 0xCB, 0xCF}


def jpeg_restart_interval(data: bytes) -> int:
    """The restart interval (DRI) a JPEG codestream's header sets before its first scan; 0 when
    none (no restart markers to check)."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0xD9, 0xDA):
            break
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker == 0xDD and pos + 6 <= len(data):
            return struct.unpack(">H", data[pos + 4:pos + 6])[0]
        pos += 2 + max(length, 2)
    return 0


def _scan_markers(data: bytes) -> tuple:
    """Where a JPEG frame's FF bytes end a scan's coded data (any marker but stuffing FF00, a
    restart marker or fill FFFF), where its restart markers are and their numbers (0-7), and,
    per restart marker, how many before it and itself do not follow the one before in sequence
    (arrays: a hostile frame holds millions of markers)."""
    import numpy as np

    ff = np.flatnonzero(np.frombuffer(data, np.uint8)[:-1] == 0xFF)
    follower = np.frombuffer(data, np.uint8)[ff + 1]
    is_rst = (follower >= 0xD0) & (follower <= 0xD7)
    number = follower[is_rst].astype(np.int64) - 0xD0
    breaks = np.concatenate(([0], np.cumsum(number[1:] != (number[:-1] + 1) % 8)))
    return ff[(follower != 0x00) & (follower != 0xFF) & ~is_rst], ff[is_rst], number, breaks


def check_jpeg_restarts(data: bytes) -> None:
    """Raise CodestreamError unless, in a JPEG (T.81) codestream with a restart interval, every
    scan's restart markers run RST0, RST1 ... RST7, RST0 ... without a gap and, for a
    one-component frame, number what its MCUs need (one per interval, less one). Restart markers
    are the one structure inside JPEG coded data: a fragment lost, or a run of zeroed bytes over
    a marker, shows as a gap or a count off, where libjpeg decodes the rest and fills the
    image. Damage between two markers stays unseen. Without a restart interval nothing is
    checked."""
    pos, interval, units, components = 2, 0, 0, 0
    markers = None  # the frame's markers (_scan_markers), found at its first scan
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise CodestreamError(f"expected a marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            return
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if pos + 2 + length > len(data) or (marker == 0xDD and length != 4):
            raise CodestreamError(f"a marker segment at byte {pos} runs past the end of the frame or is malformed")
        if marker == 0xDD:
            (interval,) = struct.unpack(">H", data[pos + 4:pos + 6])
        elif marker in _SOF and marker != 0xF7 and pos + 10 <= len(data):
            _precision, rows, columns, components = struct.unpack(">BHHB", data[pos + 4:pos + 10])
            side = 1 if marker in _LOSSLESS_SOF else 8
            units = -(-rows // side) * -(-columns // side)  # one component: an MCU is one data unit
        pos += 2 + max(length, 2)
        if marker != 0xDA:
            continue
        # the scan's coded data: up to the first FF that is neither stuffing (FF00), a restart
        # marker (FFD0-FFD7) nor fill (FFFF); the frame's markers are found once, not from each
        # scan on to the end of the frame (a frame of many tiny scans took minutes)
        if markers is None:
            markers = _scan_markers(data)
        ends, rst_at, rst_number, rst_breaks = markers
        first = int(ends.searchsorted(pos))
        if first == len(ends):
            raise CodestreamError("a scan runs to the end of the frame without a marker after it")
        end = int(ends[first])
        if interval:
            i, j = rst_at.searchsorted((pos, end)).tolist()  # the scan's restart markers
            if j > i and (rst_number[i] != 0 or rst_breaks[j - 1] != rst_breaks[i]):
                raise CodestreamError("restart markers out of sequence: coded data lost or overwritten")
            if components == 1 and units and j - i != -(-units // interval) - 1:
                raise CodestreamError(f"a scan holds {j - i} restart markers where its "
                                      f"{units} MCUs need {-(-units // interval) - 1}: coded data lost or overwritten")
        pos = end
