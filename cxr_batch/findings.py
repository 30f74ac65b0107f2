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


def check_findings(names) -> list[str]:
    """Return ``names`` as a list, raising ValueError for any name that is not a finding."""
    names = list(names)
    unknown = [n for n in names if n not in FINDINGS]
    if unknown:
        raise ValueError(f"unknown finding(s) {unknown}; known: {', '.join(FINDINGS)}")
    return names
