"""The 14 NIH ChestX-ray14 findings: the one list training, inference, CSV and PDF share.

The order is the model's output order (logit index = position). "No Finding" is not a class:
it is the all-zero label vector.
"""

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

NO_FINDING = "No Finding"

# Findings that make a study "urgent" unless the user configures another set.
DEFAULT_URGENT: tuple[str, ...] = ("Pneumothorax",)


def _key(name: str) -> str:
    """How a typed finding name is compared: case, spaces and hyphens do not matter
    ("pleural thickening" is Pleural_Thickening)."""
    return "_".join(str(name).strip().replace("-", " ").replace("_", " ").split()).lower()


_BY_KEY = {_key(f): f for f in FINDINGS}


def resolve_finding(name: str) -> str:
    """The finding a user typed, by its canonical name (``pneumothorax`` -> ``Pneumothorax``).
    ValueError for a name that is no finding, with the closest names when there are any."""
    found = _BY_KEY.get(_key(name))
    if found is not None:
        return found
    import difflib

    close = difflib.get_close_matches(_key(name), list(_BY_KEY), n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(_BY_KEY[c] for c in close)}?)" if close else ""
    raise ValueError(f"unknown finding {name!r}{hint}; known: {', '.join(FINDINGS)}")


def check_findings(names) -> list[str]:
    """``names`` as canonical finding names (case-insensitive, see :func:`resolve_finding`);
    ValueError naming every name that is not a finding."""
    resolved, problems = [], []
    for name in names:
        try:
            resolved.append(resolve_finding(name))
        except ValueError as e:
            problems.append(str(e).split("; known:")[0])
    if problems:
        raise ValueError(f"{'; '.join(problems)}; known: {', '.join(FINDINGS)}")
    return resolved
