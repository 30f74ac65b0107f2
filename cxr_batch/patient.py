"""Patient data (age, sex, view position): parsing, provenance, and the model's encoding.

The encoding is the one source of truth for training and inference. The model receives
``[age_scaled, view_code, sex_code]``:

- age in years divided by ``age_scale`` (100) and clipped to [0, 1];
- view: PA = 0, AP = 1;
- sex: M = 0, F = 1.

A value that is unknown is never a silent zero (zero would mean a newborn, PA or male): it
becomes the neutral value 0.5, the midpoint of the code range. Training replaces known values
by the same neutral value at random (``unknown_rate`` in the training config), so the model
has learned what "unknown" means, and a row in results.csv says which values were unknown.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np

MAX_PLAUSIBLE_AGE = 120.0

# Where a value came from; "unknown" means the model received the neutral value.
SOURCE_UNKNOWN = "unknown"


@dataclass(frozen=True)
class PatientEncoding:
    """How patient data become the model's tabular input; stored in every weights bundle."""

    age_scale: float = 100.0
    view_codes: dict = field(default_factory=lambda: {"PA": 0.0, "AP": 1.0})
    sex_codes: dict = field(default_factory=lambda: {"M": 0.0, "F": 1.0})
    unknown_value: float = 0.5

    def to_dict(self) -> dict:
        return {
            "order": ["age", "view", "sex"],
            "age": f"years / {self.age_scale:g}, clipped to [0, 1]",
            **asdict(self),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PatientEncoding":
        return cls(
            age_scale=float(d["age_scale"]),
            view_codes={k: float(v) for k, v in d["view_codes"].items()},
            sex_codes={k: float(v) for k, v in d["sex_codes"].items()},
            unknown_value=float(d["unknown_value"]),
        )

    def encode(self, age: float | None, view: str | None, sex: str | None) -> np.ndarray:
        """Return the float32 vector ``[age, view, sex]`` (shape [3]) the model takes."""
        u = self.unknown_value
        a = u if age is None else min(max(age / self.age_scale, 0.0), 1.0)
        v = self.view_codes.get(view, u) if view is not None else u
        s = self.sex_codes.get(sex, u) if sex is not None else u
        return np.array([a, v, s], dtype=np.float32)


@dataclass
class PatientData:
    """What is known about the patient of one image, and where each value came from."""

    age: float | None = None
    age_source: str = SOURCE_UNKNOWN
    sex: str | None = None
    sex_source: str = SOURCE_UNKNOWN
    view: str | None = None
    view_source: str = SOURCE_UNKNOWN
    notes: list[str] = field(default_factory=list)

    @property
    def all_unknown(self) -> bool:
        """Age, sex and view all unknown: a scored study's result rests on the image alone."""
        return self.age is None and self.sex is None and self.view is None

    def fill_from(self, other: "PatientData") -> None:
        """Take each value this record lacks from ``other`` (a lower-priority source)."""
        for name in ("age", "sex", "view"):
            if getattr(self, name) is None and getattr(other, name) is not None:
                setattr(self, name, getattr(other, name))
                setattr(self, name + "_source", getattr(other, name + "_source"))
        self.notes.extend(n for n in other.notes if n not in self.notes)


_AGE_RE = re.compile(r"^\s*(\d{1,3}(?:\.\d+)?)\s*([YMWD]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"Y": 1.0, "": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def parse_age(value) -> tuple[float | None, str | None]:
    """Parse an age in years from a number, ``"57"`` or a DICOM AS string (``"057Y"``,
    ``"006M"``, ``"003W"``, ``"010D"``).

    Returns ``(age_years, None)`` or ``(None, why)`` when the value is missing, unparsable or
    implausible (negative, over 120 years).
    """
    if value is None:
        return None, None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and math.isnan(value):
            return None, None
        text = str(value) if isinstance(value, float) or abs(value) < 10**20 else f"{str(value)[:17]}..."
        try:
            years = float(value)
        except OverflowError:  # a JSON sidecar's integer of hundreds of digits
            years = math.inf
    else:
        text = str(value).strip()
        if not text:
            return None, None
        m = _AGE_RE.match(text)
        if not m:
            return None, f"unparsable age {text[:20]!r}"
        years = float(m.group(1)) * _AGE_UNIT_YEARS[m.group(2).upper()]
    if not 0.0 <= years <= MAX_PLAUSIBLE_AGE:
        return None, f"implausible age {text[:20]!r}"
    return round(years, 4), None  # 4 decimals: an infant's age stays right to the day (1 day = 0.0027 years)


_SEX_MAP = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}


def parse_sex(value) -> tuple[str | None, str | None]:
    """Parse M/F (also "male"/"female"); O, empty or missing are unknown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, None
    text = str(value).strip().upper()
    if text in _SEX_MAP:
        return _SEX_MAP[text], None
    if text in ("", "O", "OTHER", "U", "UNKNOWN"):
        return None, None
    return None, f"unrecognised sex {str(value)[:20]!r}"


# Words that name a view in free text (SeriesDescription, ProtocolName, ...).
_VIEW_WORDS = (
    (re.compile(r"\b(LAT|LATERAL|LL|RL|LLAT|RLAT|LEFT LAT|RIGHT LAT)\b"), "LATERAL"),
    # decubitus (a frontal beam across a patient lying on one side) and obliques: not the PA/AP
    # views the model was trained on; before the frontal words, as a lateral is
    (re.compile(r"\b(LLD|RLD|DECUB|DECUBITUS)\b"), "DECUBITUS"),
    (re.compile(r"\b(OBL|OBLIQUE|LAO|RAO|LPO|RPO)\b"), "OBLIQUE"),
    (re.compile(r"\b(PA|P-A|POSTERO-?ANTERIOR|POSTEROANTERIOR)\b"), "PA"),
    (re.compile(r"\b(AP|A-P|ANTERO-?POSTERIOR|ANTEROPOSTERIOR|SUPINE|PORTABLE)\b"), "AP"),
)


# AP named as such (not only implied by SUPINE or PORTABLE, which a PA named beside them outweighs).
_NAMED_AP = re.compile(r"\b(AP|A-P|ANTERO-?POSTERIOR|ANTEROPOSTERIOR)\b")


def parse_view(value) -> tuple[str | None, str | None]:
    """Parse a view position. Returns "PA", "AP", "LATERAL" (and "LL"/"RL" as "LATERAL"),
    "DECUBITUS" (LLD/RLD), "OBLIQUE" (OBL, LAO, RAO, LPO, RPO) or None; free text such as
    "CHEST PA ERECT" is searched for view words."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, None
    text = re.sub(r"[_/\\^]+", " ", str(value).strip().upper())
    if not text:
        return None, None
    if text in ("PA", "AP"):
        return text, None
    if text in ("LL", "RL", "LAT", "LATERAL"):
        return "LATERAL", None
    found = [view for pattern, view in _VIEW_WORDS if pattern.search(text)]
    if found == ["PA", "AP"] and _NAMED_AP.search(text):  # "AP\\PA", "AP/PA": which one is this image?
        return None, f"view {str(value)[:30]!r} names both PA and AP"
    if found:
        return found[0], None  # a lateral first: a possible lateral is never scored
    return None, f"unrecognised view {str(value)[:30]!r}"


def patient_from_values(age, sex, view, source: str) -> PatientData:
    """Build PatientData from raw values of one source (sidecar, metadata CSV, header)."""
    data = PatientData()
    for name, raw, parse in (("age", age, parse_age), ("sex", sex, parse_sex), ("view", view, parse_view)):
        value, why = parse(raw)
        if value is not None:
            setattr(data, name, value)
            setattr(data, name + "_source", source)
        elif why:
            data.notes.append(f"{source} {why}: treated as unknown")
    return data
