"""Weights bundles: one self-describing folder per model version.

A bundle folder holds ``model.pt`` (a plain state dict, loaded with ``weights_only=True``) and
``manifest.json``: the findings in output order, the model configuration, the preprocessing,
the patient-data encoding, per-finding thresholds, what the weights were trained on, their
measured metrics, the sha256 of ``model.pt`` and ``bundle_sha256``, the sha256 of the manifest
itself (which holds the weights' sha256): a bundle is one thing, and its ``bundle_sha256``,
written in every result row, identifies the model's behaviour (weights *and* thresholds,
calibration, preprocessing, encoding). Optionally a per-finding ``calibration`` of the logits
(:mod:`cxr_batch.calibration`) that inference applies, and ``training_images.csv``, the images
the weights were made from, named with its sha256 in the manifest (:mod:`cxr_batch.provenance`;
in the manifest, so covered by ``bundle_sha256`` like the rest of the training record), and
likewise ``calibration_images.csv``, the studies ``calibrate`` fitted on. Loading
verifies the hashes (the lists' too, when there are any) and refuses
a bundle that was altered, whose thresholds are not finite numbers strictly between 0 and 1,
whose calibration is invalid or whose findings differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .calibration import Calibration, CalibrationError
from .files import atomic_write_bytes
from .findings import FINDINGS
from .patient import PatientEncoding
from .triage import TriageError, TriagePolicy

# torch takes seconds to import: only loading or saving weights needs it (load_bundle, save_bundle),
# not reading a manifest (monitor, run from cron, reads manifests alone)
if TYPE_CHECKING:
    from .model import CxrFusionNet
    from .preprocess import Preprocessing

FORMAT_VERSION = 2  # 2: bundle_sha256 over the manifest
# the model cxr_batch.model builds, as manifests name it: here, so that reading a manifest needs no torch
ARCHITECTURE = "densenet121-fpn-fusion"
WEIGHTS_FILE = "model.pt"
MANIFEST_FILE = "manifest.json"
# a bundle's model card, when its manifest names one (``model_card``: file and sha256, as for the
# weights): what `cxr-batch train` measured, sealed so that an edited card is refused
MODEL_CARD_FILE = "MODEL_CARD.md"
DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "weights" / "cxr-fpn-v3"


class BundleError(Exception):
    """A weights bundle that is missing, malformed or altered."""


@dataclass
class Bundle:
    model: CxrFusionNet
    name: str
    version: str
    preprocessing: Preprocessing
    encoding: PatientEncoding
    thresholds: dict[str, float]
    sha256: str  # bundle_sha256: manifest and weights together
    manifest: dict = field(repr=False, default_factory=dict)
    path: Path | None = None
    calibration: Calibration | None = None  # applied to the logits before the sigmoid

    @property
    def label(self) -> str:
        """Short model identification for result rows: ``name@version``."""
        return f"{self.name}@{self.version}"

    def threshold_vector(self) -> list[float]:
        return [self.thresholds[f] for f in FINDINGS]

    def triage_policy(self, urgent=None) -> TriagePolicy:
        """How this bundle flags, buckets and orders studies (:mod:`cxr_batch.triage`)."""
        policy = TriagePolicy.from_manifest({**self.manifest, "thresholds": self.thresholds})
        return policy if urgent is None else dataclasses.replace(policy, urgent=tuple(urgent))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_bundle(
    folder: Path,
    model: CxrFusionNet,
    *,
    name: str,
    version: str,
    preprocessing: Preprocessing,
    encoding: PatientEncoding,
    thresholds: dict[str, float],
    training: dict | None = None,
    metrics: dict | None = None,
    half: bool = False,
    intended_use: str | None = None,
    training_images=None,
    model_card: str | None = None,
) -> Path:
    """Write a bundle folder. ``half`` stores floating-point weights as float16 (half the size;
    loading casts back to float32). ``intended_use``: one sentence every report prints (what
    the weights are for and, if so, why not for clinical use; see :mod:`cxr_batch.evidence`).
    ``training_images``: rows (image, patient_id, role) of every image training used, written to
    ``training_images.csv`` with its sha256 in the manifest, so that an evaluation on them is
    named in-sample (:mod:`cxr_batch.provenance`). ``model_card``: the text of MODEL_CARD.md,
    written with its sha256 in the manifest (``model_card``), which loading verifies. Returns the folder."""
    import torch

    missing = [f for f in FINDINGS if f not in thresholds]
    if missing:
        raise BundleError(f"thresholds missing for {missing}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
        for k, v in model.state_dict().items()
    }
    weights_path = folder / WEIGHTS_FILE
    # serialised in memory, then written whole: torch.save straight to a full disk raised a
    # RuntimeError ('unexpected pos ...'), not an OSError naming the file
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(weights_path, buffer.getvalue(), mode=0o644)
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        **({"intended_use": intended_use} if intended_use else {}),
        "architecture": ARCHITECTURE,
        "model_config": model.config.to_dict(),
        "findings": list(FINDINGS),
        "output": "logits [B, 14] in the order of 'findings'; probability = sigmoid(logit)",
        "preprocessing": preprocessing.to_dict(),
        "patient_encoding": encoding.to_dict(),
        "thresholds": {f: float(thresholds[f]) for f in FINDINGS},
        "training": training or {},
        "metrics": metrics or {},
        "weights_file": WEIGHTS_FILE,
        "weights_dtype": "float16" if half else "float32",
        "sha256": sha256_file(weights_path),
    }
    if training_images is not None:
        from .provenance import write_image_list  # it imports this module

        manifest["training_images"] = write_image_list(folder, training_images)
    if model_card is not None:
        data = model_card.encode("utf-8")
        atomic_write_bytes(folder / MODEL_CARD_FILE, data, mode=0o644)
        manifest["model_card"] = {"file": MODEL_CARD_FILE, "sha256": hashlib.sha256(data).hexdigest()}
    write_manifest(folder, manifest)
    return folder


def write_manifest(folder: Path, manifest: dict) -> None:
    """Check the thresholds, seal the manifest with its ``bundle_sha256`` (a new one whenever
    anything in it changed, e.g. calibrate's thresholds) and write it atomically."""
    check_thresholds(manifest["thresholds"], Path(folder) / MANIFEST_FILE)
    manifest = {k: v for k, v in manifest.items() if k != "bundle_sha256"}
    manifest["bundle_sha256"] = manifest_sha256(manifest)
    atomic_write_bytes(Path(folder) / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode(), mode=0o644)


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"weights bundle {folder} is not a folder")
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        if (folder / "bundle" / MANIFEST_FILE).is_file():  # a training run folder: its bundle is inside
            raise BundleError(f"{folder} is a training run folder, not a weights bundle: use --weights "
                              f"{folder / 'bundle'}") from None
        # `--weights weights`: the default bundle first when it is one of them
        inside = sorted((p.parent for p in folder.glob(f"*/{MANIFEST_FILE}")),
                        key=lambda p: (p.resolve() != DEFAULT_BUNDLE.resolve(), p.name))
        if inside:
            raise BundleError(f"{folder} holds weights bundles, it is not one: use --weights {inside[0]}"
                              + (f" (or {', '.join(p.name for p in inside[1:])})" if len(inside) > 1 else ""))
        made = [name for name in ("results.csv", "evaluation.json", "monitor.json") if (folder / name).is_file()]
        if made:  # the results folder beside the bundle's, given by mistake
            raise BundleError(f"{folder} is a results folder ({made[0]}), not a weights bundle: --weights takes a "
                              f"bundle folder (manifest.json, model.pt), e.g. {DEFAULT_BUNDLE}") from None
        raise BundleError(f"weights bundle {folder} has no {MANIFEST_FILE}: --weights takes a bundle folder "
                          f"(manifest.json, model.pt), e.g. {DEFAULT_BUNDLE}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{folder / MANIFEST_FILE} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{folder / MANIFEST_FILE} is not a JSON object")
    made = manifest.get("format_version", FORMAT_VERSION)
    if not (type(made) is int and made <= FORMAT_VERSION):
        # settings a newer format adds (a preprocessing step) would be skipped: wrong scores, no word
        said = f"format {made}" if type(made) is int else "a format this version does not know"
        raise BundleError(f"weights bundle {folder} was made by a newer cxr-batch (bundle {said}; this version reads "
                          f"format {FORMAT_VERSION} and older): use that version, or a bundle made for this one")
    for key in ("findings", "model_config", "preprocessing", "patient_encoding", "thresholds", "sha256"):
        if key not in manifest:
            raise BundleError(f"{folder / MANIFEST_FILE} lacks '{key}'")
    check_types(manifest, folder / MANIFEST_FILE)
    if manifest.get("architecture", ARCHITECTURE) != ARCHITECTURE:
        raise BundleError(f"bundle architecture {manifest['architecture']!r} is not {ARCHITECTURE!r}")
    if list(manifest["findings"]) != list(FINDINGS):
        raise BundleError(f"bundle findings {manifest['findings']} differ from this version's {list(FINDINGS)}")
    check_thresholds(manifest["thresholds"], folder / MANIFEST_FILE)
    if "calibration" in manifest:
        try:
            Calibration.from_manifest(manifest["calibration"])
        except CalibrationError as e:
            raise BundleError(f"{folder / MANIFEST_FILE}: {e}") from None
    try:
        TriagePolicy.from_manifest(manifest)
    except TriageError as e:
        raise BundleError(f"{folder / MANIFEST_FILE}: {e}") from None
    return manifest


# The manifest's parts and the JSON type each must have (optional ones only when present).
MANIFEST_TYPES = {"findings": list, "model_config": dict, "preprocessing": dict, "patient_encoding": dict,
                  "thresholds": dict, "sha256": str, "metrics": dict, "training": dict, "calibration": dict,
                  "intended_use": str, "name": str, "version": str, "weights_file": str, "triage": dict,
                  "reference": dict,  # reference: what drift monitoring compares with (cxr_batch.drift)
                  "training_images": dict,  # the list of training images (cxr_batch.provenance)
                  "model_card": dict,  # MODEL_CARD.md's file and sha256 (check_model_card)
                  "calibration_images": dict}  # and of the studies calibrate fitted on
_TYPE_NAMES = {list: "a list", dict: "a table (JSON object)", str: "a string"}


def check_types(manifest: dict, where) -> None:
    """Every part of the manifest has its JSON type: a wrong one is named, never a crash later."""
    for key, kind in MANIFEST_TYPES.items():
        if key in manifest and not isinstance(manifest[key], kind):
            raise BundleError(f"{where}: '{key}' must be {_TYPE_NAMES[kind]}, not {type(manifest[key]).__name__}")


def manifest_sha256(manifest: dict) -> str:
    """The bundle's identity: sha256 of the manifest in canonical JSON (sorted keys, no spaces)
    without its own ``bundle_sha256``. It covers the weights through their sha256."""
    body = {k: v for k, v in manifest.items() if k != "bundle_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_thresholds(thresholds, where) -> None:
    """Thresholds must name every finding, no other, each a finite number strictly in (0, 1):
    0 would flag every study, 1 none, NaN none silently."""
    if not isinstance(thresholds, dict):
        raise BundleError(f"{where}: 'thresholds' must map each finding to a number")
    extra = sorted(set(thresholds) - set(FINDINGS))
    missing = [f for f in FINDINGS if f not in thresholds]
    if missing or extra:
        raise BundleError(f"{where}: thresholds missing for {missing}" if missing else
                          f"{where}: thresholds for unknown findings {extra}")
    for f in FINDINGS:
        t = thresholds[f]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0.0 < t < 1.0:
            raise BundleError(f"{where}: threshold for {f} is {t!r}; it must be a number strictly between 0 and 1")


def check_model_card(folder: Path, manifest: dict) -> None:
    """The model card the manifest names must be there, unaltered: its figures are the ones the
    weights were measured with, and an edited card would report others. A bundle whose manifest
    names none (the bundled weights' cards are not sealed) passes. Raises BundleError."""
    record = manifest.get("model_card")
    if record is None:
        return
    where = Path(folder) / MANIFEST_FILE
    if not isinstance(record.get("file"), str) or not isinstance(record.get("sha256"), str) \
            or Path(record["file"]).name != record["file"]:
        raise BundleError(f"{where}: 'model_card' must name a file in the bundle and its sha256")
    path = Path(folder) / record["file"]
    if not path.is_file():
        raise BundleError(f"{path}, the model card {where} names, is missing")
    if sha256_file(path) != record["sha256"]:
        # refused, not warned of: the card is what the bundle was approved on (inside bundle_sha256);
        # a site's own notes belong in another file, and the error says how to get the bundle back
        raise BundleError(f"{path} fails its checksum (manifest sha256 {record['sha256']}): the model card was edited "
                          f"after the bundle was made; refusing to use it. Put back the card as made (the copy "
                          f"`cxr-batch train` left as {record['file']} in the run folder, or the bundle as delivered) "
                          f"and keep the site's own notes in another file of the folder (e.g. SITE_NOTES.md), "
                          f"which loading does not read")


def is_bundle(folder: Path) -> bool:
    return (folder / MANIFEST_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def refuse_output_in_bundle(out: Path, bundle: Path, what: str = "--out") -> None:
    """Results never go into a weights bundle: not into any bundle folder (the one in use or
    another) or a folder inside one, not into the folder that holds the bundle in use, not into
    the shipped ``weights/`` folder or a new folder there. Raises BundleError."""
    out, bundle = Path(out).resolve(), Path(bundle).resolve()
    for folder in (out, *out.parents):
        if folder == bundle or is_bundle(folder):
            raise BundleError(f"{what} {out} is the weights bundle {folder} or inside it: a bundle is never written to")
    shipped = DEFAULT_BUNDLE.resolve().parent  # weights/: no results there, nor in a new folder there
    holder = out if out in (shipped, bundle.parent) else shipped if out.parent == shipped else None
    if holder is not None:
        raise BundleError(f"{what} {out} is in the folder that holds weights bundles ({holder}): "
                          f"choose a folder of its own")


def load_bundle(folder: Path | str | None = None) -> Bundle:
    """Load and verify a bundle (default: the bundled weights). Raises BundleError."""
    import torch

    from .model import CxrFusionNet, ModelConfig
    from .preprocess import Preprocessing

    folder = Path(folder) if folder is not None else DEFAULT_BUNDLE
    manifest = read_manifest(folder)
    weights_path = folder / manifest.get("weights_file", WEIGHTS_FILE)
    if not weights_path.is_file():
        raise BundleError(f"weights file {weights_path} is missing")
    actual = sha256_file(weights_path)
    if actual != manifest["sha256"]:
        raise BundleError(
            f"weights file {weights_path} fails its checksum: manifest sha256 {manifest['sha256']}, "
            f"file sha256 {actual}. The weights were altered or corrupted; refusing to use them."
        )
    recorded = manifest.get("bundle_sha256")
    if not recorded:
        raise BundleError(f"{folder / MANIFEST_FILE} has no bundle_sha256 (a bundle made by an older cxr-batch): "
                          f"its thresholds and settings are not covered by a checksum; re-export it")
    if manifest_sha256(manifest) != recorded:
        raise BundleError(f"{folder / MANIFEST_FILE} fails its checksum (bundle_sha256 {recorded}): the manifest "
                          f"was edited after the bundle was made; refusing to use it")
    from .provenance import CALIBRATION, TRAINING, read_rows  # it imports this module

    for kind in (TRAINING, CALIBRATION):
        read_rows(folder, manifest, kind)  # a list the manifest names must be there, unaltered
    check_model_card(folder, manifest)
    where = folder / MANIFEST_FILE
    settings = {}
    for key, parse in (("model_config", ModelConfig.from_dict), ("preprocessing", Preprocessing.from_dict),
                       ("patient_encoding", PatientEncoding.from_dict)):
        try:
            settings[key] = parse(manifest[key])
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # ConfigError is a ValueError
            what = f"lacks {e}" if isinstance(e, KeyError) else str(e)
            raise BundleError(f"{where}: '{key}' is not valid: {what}") from None
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model = CxrFusionNet(settings["model_config"])
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except Exception as e:  # a bad pickle or a shape mismatch: the bundle is unusable
        raise BundleError(f"weights file {weights_path} cannot be loaded into the model: {e}") from None
    model.eval()
    thresholds = {f: float(manifest["thresholds"][f]) for f in FINDINGS}
    return Bundle(
        model=model,
        name=manifest.get("name", folder.name),
        version=str(manifest.get("version", "")),
        preprocessing=settings["preprocessing"],
        encoding=settings["patient_encoding"],
        thresholds=thresholds,
        sha256=recorded,
        manifest=manifest,
        path=folder,
        calibration=Calibration.from_manifest(manifest["calibration"]) if "calibration" in manifest else None,
    )
