"""The bundle's manifest.json: what is inside (hashes, I/O, operators, libraries) and what was measured.

``verify_files`` is the first half of ``edgeprune package --verify``: every file the manifest
lists must be there with its size and sha256, so an edited bundle is named, file by file.
"""

from __future__ import annotations

import json
import logging
import pathlib

import onnxruntime

from edgeprune import model_io
from edgeprune.errors import BadInputError

logger = logging.getLogger(__name__)

SCHEMA = "edgeprune.bundle/1"
MANIFEST = "manifest.json"


def file_entry(path: pathlib.Path, role: str) -> dict:
    return {"path": path.name, "role": role, "bytes": path.stat().st_size, "sha256": model_io.sha256(path)}


def io_spec(session: onnxruntime.InferenceSession) -> dict:
    """Names, dtypes and shapes as ORT reports them for the bundle's model (what the app feeds)."""
    def one(v):
        return {"name": v.name, "dtype": v.type, "shape": [d if isinstance(d, int) else (d or "?") for d in (v.shape or [])]}

    return {"inputs": [one(v) for v in session.get_inputs()], "outputs": [one(v) for v in session.get_outputs()]}


def ort_version_range() -> dict:
    """The ORT version that wrote the .ort files, and the range that reads them.

    ORT format files are read by the release that wrote them and later ones (ORT keeps
    backward compatibility of the format since 1.13); earlier releases may not know the kernels.
    """
    return {"built_with": onnxruntime.__version__, "minimum": onnxruntime.__version__, "maximum": None}


def write(bundle: pathlib.Path, manifest: dict) -> pathlib.Path:
    path = bundle / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read(bundle: pathlib.Path) -> dict:
    """Load a bundle's manifest, refusing a folder that is not a bundle or a manifest of another schema."""
    bundle = pathlib.Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BadInputError(f"{bundle} is not a folder: --verify takes the bundle folder edgeprune package wrote.")
    if not path.is_file():
        raise BadInputError(f"{bundle} has no {MANIFEST}: --verify takes the bundle folder edgeprune package wrote.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path} is not valid JSON ({exc.__class__.__name__}): the manifest was edited or truncated; re-run edgeprune package.") from exc
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise BadInputError(f"{path} is not an {SCHEMA} manifest: re-run edgeprune package to rebuild the bundle.")
    return manifest


def verify_files(bundle: pathlib.Path, manifest: dict) -> list[str]:
    """Check each listed file's presence, size and sha256; return the names checked."""
    checked = []
    for entry in manifest.get("files", []):
        path = bundle / entry["path"]
        if not path.is_file():
            raise BadInputError(f"{entry['path']} is missing from the bundle {bundle}: restore it or re-run edgeprune package.")
        if path.stat().st_size != entry["bytes"] or model_io.sha256(path) != entry["sha256"]:
            raise BadInputError(
                f"{entry['path']} in {bundle} was changed after packaging (its sha256 differs from the manifest): "
                "restore the original file or re-run edgeprune package."
            )
        checked.append(entry["path"])
    return checked
