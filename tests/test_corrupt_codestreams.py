"""Compressed pixel data damaged the way a failing transfer or disk damages it: cut short, a
run of zeroed bytes, a flipped bit, a lost fragment, a lost end marker. Files are made by the
real encoders (dcmtk, gdcm, pydicom's) from a real NIH radiograph; each damaged one must be
refused with a reason on its row, never decoded to a plausible image and scored.

What no check can see is left out here and said in the README: zeroed bytes or a flipped bit
inside JPEG 2000 or JPEG data, or RLE data whose runs stay within the frame, decode to a valid,
somewhat different image: these codestreams carry no checksum and their decoders do not say
where the coded data and the image disagree."""

import copy
import struct

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000, JPEG2000Lossless

from cxr_batch.dicom_build import radiograph, save
from cxr_batch.readers import read_study
from cxr_batch.results import read_results
from cxr_batch.scan import ScanConfig, run_scan
from cxr_batch.study import ReadError, ScoringRules

from .dicomgen import HEADER, grey, have, run

RULES = ScoringRules()
needs_dcmtk_gdcm = pytest.mark.skipif(not have("dcmcjpls", "dcmcrle", "img2dcm", "gdcmconv"),
                                      reason="dcmtk/gdcm not installed")


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, nih_images):
    """One real radiograph, 12 bits stored, written by each encoder: {name: path}. The
    '-fragments' files are split into 4 KB fragments by the tool itself."""
    d = tmp_path_factory.mktemp("encoded")
    ds = radiograph(grey(nih_images[0]).astype(np.uint16) * 16, bits_stored=12, **HEADER)
    plain = save(ds, d / "plain.dcm")

    def tool(name, *cmd, source=plain):
        run(*cmd, source, d / name)
        return d / name

    lossy = copy.deepcopy(ds)
    lossy.compress(JPEG2000, j2k_cr=[10], encoding_plugin="pylibjpeg")  # compression ratio 10
    lossy.save_as(d / "pj2k_lossy.dcm", enforce_file_format=True)
    return {
        "jpegls-dcmcjpls": tool("jls.dcm", "dcmcjpls", "+el"),
        "jpegls-near-dcmcjpls": tool("jlsn.dcm", "dcmcjpls", "+en", "+md", "2"),
        "jpegls-gdcmconv": tool("gjls.dcm", "gdcmconv", "--jpegls"),
        "jpegls-fragments": tool("jlsf.dcm", "dcmcjpls", "+el", "+fs", "4"),
        "j2k-gdcmconv": tool("gj2k.dcm", "gdcmconv", "--j2k"),
        "j2k-fragments": tool("gj2kf.dcm", "gdcmconv", "--split", "4096", source=d / "gj2k.dcm"),  # splits only a compressed one
        "j2k-pydicom": save(ds, d / "pj2k.dcm", JPEG2000Lossless),
        "j2k-lossy-pydicom": d / "pj2k_lossy.dcm",
        "rle-dcmcrle": tool("rle.dcm", "dcmcrle"),
        "j2k-tiled-pillow": _j2k_by_pillow(ds, d / "tiled.dcm", tile_size=(128, 128), no_jp2=True),
        "jp2-pillow": _j2k_by_pillow(ds, d / "jp2.dcm"),  # the JP2 file format, as some old converters wrote
        "jpeg-restarts-img2dcm": _jpeg_with_restarts(nih_images[0], d),
        "jpeg-restarts-fragments": tool("rstf.dcm", "gdcmconv", "--split", "2048", source=d / "rst.dcm"),
        # a 6 KB comment before the frame header, split in 2 KB fragments: the header is in the fourth
        "jpeg-comment-fragments": tool("comf.dcm", "gdcmconv", "--split", "2048",
                                       source=_jpeg_with_restarts(nih_images[0], d, "com", comment=b"x" * 6000)),
    }


def _j2k_by_pillow(ds, path, **options):
    """``ds`` as JPEG 2000 lossless made by Pillow's openjpeg encoder: 16 tiles, or a JP2 file."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(ds.pixel_array).save(buf, "JPEG2000", irreversible=False, **options)
    out = copy.deepcopy(ds)
    out.PixelData = encapsulate([buf.getvalue() + b"\x00" * (len(buf.getvalue()) % 2)])
    out["PixelData"].VR = "OB"
    out.file_meta.TransferSyntaxUID = JPEG2000Lossless
    out.save_as(path, enforce_file_format=True)
    return path


def _jpeg_with_restarts(png, d, name="rst", **options):
    """A JPEG with a restart marker after every MCU row (as many modalities write), wrapped by
    dcmtk's img2dcm; ``options`` for Pillow's encoder."""
    from PIL import Image

    Image.open(png).convert("L").save(d / f"{name}.jpg", quality=95, restart_marker_rows=1, **options)
    run("img2dcm", "-k", "PatientAge=057Y", "-k", "PatientSex=F", "-k", "ViewPosition=PA", d / f"{name}.jpg",
        d / f"{name}.dcm")
    return d / f"{name}.dcm"


def _frame(path) -> bytes:
    return next(generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))


def _with_frame(path, out, frame: bytes):
    """``path`` with its one frame replaced by ``frame`` (one fragment, padded to even length)."""
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([frame + b"\x00" * (len(frame) % 2)])
    ds.save_as(out, enforce_file_format=True)
    return out


def _without_fragment(path, out):
    """``path`` (several fragments) with the middle fragment lost, the items re-written around it."""
    ds = pydicom.dcmread(path)
    fragments = list(pydicom.encaps.generate_fragments(ds.PixelData))[1:]  # the first item is the offset table
    assert len(fragments) > 4  # the tool did split the frame
    del fragments[len(fragments) // 2]
    items = [b"", *fragments]
    ds.PixelData = (b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(f)) + f for f in items)
                    + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    ds.save_as(out, enforce_file_format=True)
    return out


def _zeroed(frame: bytes, at: float, n: int) -> bytes:
    i = int(len(frame) * at)
    return frame[:i] + b"\x00" * len(frame[i:i + n]) + frame[i + n:]


def _flipped(frame: bytes, at: float, bit: int) -> bytes:
    b = bytearray(frame)
    b[int(len(b) * at)] ^= bit
    return bytes(b)


def _end_marker_lost(frame: bytes) -> bytes:
    """The last two bytes of the codestream (JPEG EOI, JPEG 2000 EOC) gone, padding kept off."""
    return frame.rstrip(b"\x00")[:-2]


CUTS = {"cut50": lambda f: f[:len(f) // 2], "cut90": lambda f: f[:int(len(f) * 0.9)],
        "cut99": lambda f: f[:int(len(f) * 0.99)], "no-end-marker": _end_marker_lost}
# What each codec's frame may suffer and still be told apart from a whole one.
DAMAGE = {
    "jpegls": {**CUTS, "zeros64": lambda f: _zeroed(f, 0.5, 64), "zeros4k": lambda f: _zeroed(f, 0.5, 4096),
               "flip30": lambda f: _flipped(f, 0.3, 0x10), "flip60": lambda f: _flipped(f, 0.6, 0x10),
               "flip90": lambda f: _flipped(f, 0.9, 0x01)},
    # the end marker overwritten (a zeroed sector at the end of the file): openjpeg decodes it
    "j2k": {**CUTS, "end-zeroed": lambda f: _zeroed(f, 0.99, len(f))},
    # a zeroed run that overruns the frame: pylibjpeg-rle panicked (a BaseException) and ended the scan
    "rle": {**CUTS, "zeros64": lambda f: _zeroed(f, 0.5, 64)},
    # restart markers overwritten: a marker missing from the sequence (damage between two
    # markers, a 64-byte run or a flipped bit, decodes unseen)
    "jpeg": {**CUTS, "zeros4k": lambda f: _zeroed(f, 0.5, 4096)},
}
CASES = [(name, damage) for name in ("jpegls-dcmcjpls", "jpegls-near-dcmcjpls", "jpegls-gdcmconv", "j2k-gdcmconv",
                                     "j2k-pydicom", "j2k-lossy-pydicom", "j2k-tiled-pillow", "jp2-pillow", "rle-dcmcrle",
                                     "jpeg-restarts-img2dcm")
         for damage in DAMAGE[name.split("-")[0].replace("jp2", "j2k")]]


@needs_dcmtk_gdcm
def test_the_undamaged_files_are_read(encoded):
    """Every check below passes what the encoders write."""
    for name, path in encoded.items():
        for side in (0, 64):
            assert read_study(path, RULES, min_side=side).grey.std() > 10, name


@needs_dcmtk_gdcm
@pytest.mark.parametrize("name, damage", CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_a_damaged_frame_is_refused_not_scored(encoded, tmp_path, name, damage):
    damaged = DAMAGE[name.split("-")[0].replace("jp2", "j2k")][damage](_frame(encoded[name]))
    path = _with_frame(encoded[name], tmp_path / "damaged.dcm", damaged)
    for side in (0, 64):  # full decode, and the reduced decode a scan uses
        with pytest.raises(ReadError, match="corrupt|truncated"):
            read_study(path, RULES, min_side=side)


@needs_dcmtk_gdcm
@pytest.mark.parametrize("name", ["jpegls-fragments", "j2k-fragments", "jpeg-restarts-fragments"])
def test_a_lost_fragment_is_refused_not_scored(encoded, tmp_path, name):
    path = _without_fragment(encoded[name], tmp_path / "lost.dcm")
    for side in (0, 64):
        with pytest.raises(ReadError, match="corrupt or truncated"):
            read_study(path, RULES, min_side=side)


@needs_dcmtk_gdcm
def test_a_scan_gives_damaged_files_error_rows_and_goes_on(encoded, tmp_path, small_bundle):
    """One damaged file of each codec beside their whole originals: the damaged ones get error
    rows that say the pixel data are corrupt or truncated, the others are scored, the exit code is 3."""
    studies = tmp_path / "studies"
    studies.mkdir()
    damaged = {
        "jpegls-zeros.dcm": _with_frame(encoded["jpegls-dcmcjpls"], studies / "jpegls-zeros.dcm",
                                        _zeroed(_frame(encoded["jpegls-dcmcjpls"]), 0.5, 64)),
        "jpegls-lost-fragment.dcm": _without_fragment(encoded["jpegls-fragments"], studies / "jpegls-lost-fragment.dcm"),
        "j2k-end-zeroed.dcm": _with_frame(encoded["j2k-pydicom"], studies / "j2k-end-zeroed.dcm",
                                          _zeroed(_frame(encoded["j2k-pydicom"]), 0.99, 1 << 20)),
        "rle-zeros.dcm": _with_frame(encoded["rle-dcmcrle"], studies / "rle-zeros.dcm",
                                     _zeroed(_frame(encoded["rle-dcmcrle"]), 0.5, 64)),
    }
    for name in ("jpegls-dcmcjpls", "j2k-pydicom", "rle-dcmcrle"):
        (studies / f"{name}.dcm").write_bytes(encoded[name].read_bytes())
    summary = run_scan(studies, tmp_path / "out", ScanConfig(weights=str(small_bundle), device="cpu", batch_size=4,
                                                             workers=1, progress=False, pdf=False))
    rows = {r["file"]: r for r in read_results(tmp_path / "out" / "results.csv")}
    assert set(rows) == set(damaged) | {f"{n}.dcm" for n in ("jpegls-dcmcjpls", "j2k-pydicom", "rle-dcmcrle")}
    for name, row in rows.items():
        if name in damaged:
            assert row["status"] == "error" and "corrupt or truncated" in row["reason"], (name, row["reason"])
        else:
            assert row["status"] == "ok", (name, row["reason"])
    assert summary.exit_code == 3


# (an RLE frame holds no size of its own: one taller than Rows is decoded cut to Rows, unseen)
SIZES = [(name, rows, columns) for name in ("jpegls-dcmcjpls", "j2k-gdcmconv", "rle-dcmcrle", "jpeg-restarts-img2dcm")
         for rows, columns in ((520, 512), (512, 520), (500, 512)) if (name, rows) != ("rle-dcmcrle", 500)]


@needs_dcmtk_gdcm
@pytest.mark.parametrize("name, rows, columns", SIZES, ids=[f"{n}-{r}x{c}" for n, r, c in SIZES])
def test_a_header_size_the_frame_does_not_have_is_refused(encoded, tmp_path, name, rows, columns):
    """Rows/Columns edited (or written by a broken converter) so that they disagree with the
    frame the codestream holds: never decoded into a sheared or padded image."""
    ds = pydicom.dcmread(encoded[name])
    ds.Rows, ds.Columns = rows, columns
    ds.save_as(tmp_path / "resized.dcm", enforce_file_format=True)
    with pytest.raises(ReadError, match="header says|cannot be decoded"):
        read_study(tmp_path / "resized.dcm", RULES)


def _segment_length_set(frame: bytes, marker: bytes, length: int) -> bytes:
    at = frame.index(marker)
    return frame[:at + 2] + struct.pack(">H", length) + frame[at + 4:]


# a marker segment whose length runs past the frame: a start-of-scan length overwritten, and a
# restart interval segment cut by the end of the frame
OVERRUNS = {"sos-length": lambda f: _segment_length_set(f, b"\xff\xda", 0xFFFF),
            "dri-at-the-end": lambda f: f.rstrip(b"\x00")[:-2] + b"\xff\xdd\xff\xd9"}


@needs_dcmtk_gdcm
@pytest.mark.parametrize("damage", OVERRUNS)
def test_a_segment_running_past_the_frame_is_refused_as_corrupt_with_its_study_named(encoded, tmp_path, damage):
    """The restart check read such a frame into a ValueError or struct.error: the row said
    'unexpected error while reading' and lost the header (no patient, no accession number)."""
    name = "jpeg-restarts-img2dcm"
    path = _with_frame(encoded[name], tmp_path / "overrun.dcm", OVERRUNS[damage](_frame(encoded[name])))
    with pytest.raises(ReadError, match="corrupt or truncated") as caught:
        read_study(path, RULES)
    assert caught.value.header is not None and caught.value.header.patient.sex == "F"


def test_a_frame_of_many_tiny_scans_is_searched_for_markers_once(monkeypatch):
    """Each scan's coded data was looked for from its start to the end of the frame: a 2 MB
    frame of 180,000 one-byte scans (a restart interval set, so it is checked) took minutes of
    a core, and a sender could keep the node's readers busy at the reading time limit per file.
    The frame's markers are found in one pass, whatever its number of scans (counted, not timed)."""
    from cxr_batch import codestream
    from cxr_batch.codestream import CodestreamError, check_jpeg_restarts

    passes = []
    search = codestream._scan_markers
    monkeypatch.setattr(codestream, "_scan_markers", lambda data: passes.append(len(data)) or search(data))
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 8, 8, 1) + b"\x01\x11\x00"
    scan = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x00"
    frame = b"\xff\xd8\xff\xdd\x00\x04\x00\x01" + sof + scan * 180_000 + b"\xff\xd9"
    check_jpeg_restarts(frame)  # each scan well formed: nothing to refuse
    assert passes == [len(frame)]
    with pytest.raises(CodestreamError, match="out of sequence"):
        check_jpeg_restarts(frame[:-2] + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00\x00\xff\xd1\x00\xff\xd9")
    assert len(passes) == 2


def _j2k_tile_parts(frame: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """A JPEG 2000 codestream's main header and its tile-parts as (tile index, bytes)."""
    pos = 2
    while frame[pos + 1] != 0x90:
        pos += 2 + struct.unpack(">H", frame[pos + 2:pos + 4])[0]
    main, parts = frame[:pos], []
    while frame[pos:pos + 2] == b"\xff\x90":
        isot, psot = struct.unpack(">HI", frame[pos + 4:pos + 10])
        parts.append((isot, frame[pos:pos + psot]))
        pos += psot
    return main, parts


def _enlarged(path, out, factor: int = 2):
    """``path``'s codestream with its SIZ image size multiplied by ``factor`` and Rows/Columns
    lying to match: the coded tiles cover only the first 1/factor^2 of the image declared."""
    ds = pydicom.dcmread(path)
    frame = bytearray(_frame(path))
    siz = frame.index(b"\xff\x4f\xff\x51") + 8  # Xsiz, Ysiz (in a JP2 file, inside its codestream box)
    columns, rows = struct.unpack(">II", frame[siz:siz + 8])
    struct.pack_into(">II", frame, siz, columns * factor, rows * factor)
    ds.Rows, ds.Columns = rows * factor, columns * factor
    ds.SOPInstanceUID = pydicom.uid.generate_uid()  # another image, not a second version of the original
    ds.PixelData = encapsulate([bytes(frame) + b"\x00" * (len(frame) % 2)])
    ds.save_as(out, enforce_file_format=True)
    return out


@needs_dcmtk_gdcm
@pytest.mark.parametrize("name", ["j2k-tiled-pillow", "j2k-gdcmconv", "j2k-pydicom", "jp2-pillow"])
def test_a_j2k_codestream_enlarged_beyond_its_tiles_is_refused_not_scored_black(encoded, tmp_path, name):
    """A SIZ that declares a larger image than its coded tiles cover, with Rows/Columns edited to
    agree (a hostile sender, or a converter that rewrote the size): openjpeg decoded the tiles
    that are not there as black, and the study was scored on a radiograph three quarters black."""
    path = _enlarged(encoded[name], tmp_path / "enlarged.dcm")
    for side in (0, 64):
        with pytest.raises(ReadError, match="corrupt or truncated .*tiles of which .* are missing"):
            read_study(path, RULES, min_side=side)


TILE_LOSSES = {"two-middle-tiles": lambda parts: [p for p in parts if p[0] not in (5, 6)],
               "the-last-tiles": lambda parts: parts[:-2],
               "a-tile-twice": lambda parts: [parts[3] if p[0] == 5 else p for p in parts]}


@needs_dcmtk_gdcm
@pytest.mark.parametrize("loss", TILE_LOSSES)
def test_a_j2k_codestream_with_whole_tiles_missing_is_refused_not_scored_black(encoded, tmp_path, loss):
    """Whole tile-parts lost (the chain of tile-part lengths still runs to the end marker, so the
    check of the chain passed): openjpeg decoded the missing tiles as black squares."""
    main, parts = _j2k_tile_parts(_frame(encoded["j2k-tiled-pillow"]))
    assert len(parts) == 16
    frame = main + b"".join(p for _, p in TILE_LOSSES[loss](parts)) + b"\xff\xd9"
    path = _with_frame(encoded["j2k-tiled-pillow"], tmp_path / "lost-tiles.dcm", frame)
    for side in (0, 64):
        with pytest.raises(ReadError, match="corrupt or truncated|cannot be decoded"):
            read_study(path, RULES, min_side=side)


@needs_dcmtk_gdcm
def test_a_scan_gives_an_enlarged_j2k_an_error_row_not_a_score(encoded, tmp_path, small_bundle):
    """As a user saw it: the enlarged file was scored 'ok', mostly black."""
    studies = tmp_path / "studies"
    studies.mkdir()
    _enlarged(encoded["j2k-tiled-pillow"], studies / "enlarged.dcm")
    (studies / "whole.dcm").write_bytes(encoded["j2k-tiled-pillow"].read_bytes())
    run_scan(studies, tmp_path / "out", ScanConfig(weights=str(small_bundle), device="cpu", batch_size=4, workers=1,
                                                   progress=False, pdf=False))
    rows = {r["file"]: r for r in read_results(tmp_path / "out" / "results.csv")}
    assert rows["whole.dcm"]["status"] == "ok"
    assert rows["enlarged.dcm"]["status"] == "error" and "64 tiles of which 48 are missing" in rows["enlarged.dcm"]["reason"]
