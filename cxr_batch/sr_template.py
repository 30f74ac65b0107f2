"""Byte templates of DICOM files: a dataset encoded once, refilled per use in microseconds.

A :class:`ByteTemplate` is compiled from a dataset whose per-use values are recognisable
(``match`` names them): each such data element becomes a *slot*, every other element is kept
as the bytes pydicom wrote for it, and a sequence that holds a slot keeps its structure so its
item and sequence lengths can be recomputed. :meth:`ByteTemplate.render` then writes the file
for other values: slots are encoded by pydicom's own element writer (same padding, character
set and number formatting as a full write), everything else is copied. Only what pydicom writes
for a fresh dataset is supported: explicit VR little endian, defined lengths; anything else is
refused when compiling (:class:`TemplateError`), never written differently.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Union

from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import ExplicitVRLittleEndian

# What the caller's matcher returns for an element that is a slot: the name of the value it
# carries and how that value becomes the element's value (None: as it is).
Transform = Callable[[object], object] | None
Match = Callable[[DataElement], tuple[str, Transform] | None]

_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian
_UL = struct.Struct("<I")
_GROUP_LENGTH = b"\x02\x00\x00\x00UL\x04\x00"  # (0002,0000) UL, 4 bytes


class TemplateError(Exception):
    """A dataset that cannot be made into a byte template (the caller writes it in full)."""


@dataclass(frozen=True)
class _Slot:
    tag: int
    vr: str
    name: str
    transform: Transform
    encodings: tuple[str, ...]


@dataclass(frozen=True)
class _Sequence:
    header: bytes  # tag, "SQ", 2 reserved bytes; the 4-byte length follows
    items: tuple[tuple["_Node", ...], ...]


_Node = Union[bytes, _Slot, _Sequence]


def _element_bytes(elem: DataElement, encodings) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem, encodings)
    return fp.getvalue()


def _merge(nodes: list[_Node]) -> tuple[_Node, ...]:
    """Adjacent fixed bytes joined: fewer pieces to copy per render."""
    out: list[_Node] = []
    for node in nodes:
        if isinstance(node, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += node
        else:
            out.append(node)
    return tuple(out)


def _compile(dataset: Dataset, parent_encodings: list[str], match: Match, found: set[str]) -> tuple[_Node, ...]:
    """``dataset`` as pydicom's write_dataset writes it (tag order, no group lengths past
    group 6, the character set of the nearest dataset that names one)."""
    encodings = convert_encodings(dataset.get("SpecificCharacterSet", parent_encodings))
    nodes: list[_Node] = []
    for tag in sorted(dataset.keys()):
        if tag.element == 0 and tag.group > 6:
            continue
        elem = dataset[tag]
        if elem.VR == "SQ":
            items = tuple(_compile(item, encodings, match, found) for item in elem.value)
            if all(isinstance(node, bytes) for item in items for node in item):
                # nothing per-use inside: the whole sequence is fixed bytes
                nodes.append(_element_bytes(elem, encodings))
                continue
            if elem.is_undefined_length or any(getattr(i, "is_undefined_length_sequence_item", False)
                                               for i in elem.value):
                raise TemplateError(f"sequence {tag} has an undefined length")
            nodes.append(_Sequence(_element_bytes(DataElement(tag, "SQ", []), encodings)[:8], items))
            continue
        hit = match(elem)
        if hit is None:
            nodes.append(_element_bytes(elem, encodings))
        else:
            name, transform = hit
            found.add(name)
            nodes.append(_Slot(int(tag), elem.VR, name, transform, tuple(encodings)))
    return _merge(nodes)


class _Renderer:
    """One render: each slot's bytes encoded once per (tag, VR, value name), since the same
    value (the source image's UIDs above all) recurs dozens of times."""

    def __init__(self, values: dict[str, object]):
        self.values = values
        self.memo: dict[tuple, bytes] = {}

    def slot(self, slot: _Slot) -> bytes:
        key = (slot.tag, slot.vr, slot.name, slot.transform)
        out = self.memo.get(key)
        if out is None:
            value = self.values[slot.name]
            if value is None:  # an optional attribute this use does not have
                out = b""
            else:
                if slot.transform is not None:
                    value = slot.transform(value)
                out = _element_bytes(DataElement(slot.tag, slot.vr, value), list(slot.encodings))
            self.memo[key] = out
        return out

    def nodes(self, nodes: tuple[_Node, ...]) -> bytes:
        parts = []
        for node in nodes:
            if type(node) is bytes:
                parts.append(node)
            elif type(node) is _Slot:
                parts.append(self.slot(node))
            else:
                body = b"".join(_ITEM + _UL.pack(len(item)) + item for item in map(self.nodes, node.items))
                parts.append(node.header + _UL.pack(len(body)) + body)
        return b"".join(parts)


@dataclass(frozen=True)
class ByteTemplate:
    preamble: bytes
    meta: tuple[_Node, ...]  # the file meta group without its group length
    body: tuple[_Node, ...]
    names: frozenset[str]  # the values a render needs

    @classmethod
    def compile(cls, dataset: Dataset, match: Match) -> "ByteTemplate":
        """The template of ``dataset`` (with ``file_meta``, explicit VR little endian) as
        ``dataset.save_as(..., enforce_file_format=True)`` writes it."""
        meta = getattr(dataset, "file_meta", None)
        if meta is None or meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
            raise TemplateError("only explicit VR little endian files are templated")
        meta = Dataset({tag: meta[tag] for tag in meta.keys() if tag != 0x00020000})
        found: set[str] = set()
        compiled_meta = _compile(meta, ["iso8859"], match, found)
        body = _compile(dataset, ["iso8859"], match, found)
        preamble = getattr(dataset, "preamble", None) or b"\x00" * 128
        return cls(preamble, compiled_meta, body, frozenset(found))

    def render(self, values: dict[str, object]) -> bytes:
        """The file for ``values`` (every name in :attr:`names`; None omits an element)."""
        missing = self.names - values.keys()
        if missing:
            raise KeyError(f"no value for {sorted(missing)}")
        renderer = _Renderer(values)
        meta = renderer.nodes(self.meta)
        return b"".join((self.preamble, b"DICM", _GROUP_LENGTH, _UL.pack(len(meta)), meta,
                         renderer.nodes(self.body)))
