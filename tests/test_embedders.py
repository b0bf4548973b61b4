"""Embedders (FaceNet, dlib), the FaceNet Keras rebuild, and model file checks.

The FaceNet model is built once per test session (a few seconds).
Regenerate the stored reference embeddings after an intended change with
    python tests/test_embedders.py --write-reference
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

if __name__ == "__main__":  # run as a script to rewrite the reference
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing import (
    Embedder,
    ModelFileError,
    detect_faces,
    face_encodings,
    get_embedder,
    load_image_file,
)
from preprocessing import models as model_registry

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parent / "data" / "embedding_reference.json"
REFERENCE_IMAGE = "George_W_Bush/George_W_Bush_0001.jpg"
PAIR_PEOPLE = ("Colin_Powell", "George_W_Bush", "Gerhard_Schroeder", "Tony_Blair")
PAIR_IMAGES = (1, 2, 3)
BACKENDS = ("facenet", "dlib")


# --- fixtures -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def facenet_module():  # noqa: ANN201
    from preprocessing import facenet

    facenet.load_model()
    return facenet


@pytest.fixture(scope="session")
def h5_config() -> dict:
    with h5py.File(model_registry.model_path("facenet_keras"), "r") as fh:
        config = fh.attrs["model_config"]
    return json.loads(config.decode() if isinstance(config, bytes) else config)


@pytest.fixture(scope="session")
def pair_embeddings(lfw10: Path) -> dict[str, tuple[np.ndarray, list[str]]]:
    """backend -> (embeddings (12, 128), labels) for 4 people x 3 lfw10 images."""
    images, faces, labels = [], [], []
    for person in PAIR_PEOPLE:
        for n in PAIR_IMAGES:
            image = load_image_file(lfw10 / person / f"{person}_{n:04d}.jpg")
            found = detect_faces(image)
            assert found, f"no face in {person}_{n:04d}.jpg"
            images.append(image)
            faces.append(found[0])
            labels.append(person)
    result = {}
    for backend in BACKENDS:
        embedder = get_embedder(backend)
        crops = [embedder.crops(image, [face])[0] for image, face in zip(images, faces)]
        result[backend] = (embedder.embed_crops(crops), labels)
    return result


# --- embedder contract ------------------------------------------------------------------
def test_get_embedder_names_and_cache() -> None:
    for name in BACKENDS:
        embedder = get_embedder(name)
        assert embedder is get_embedder(name)
        assert isinstance(embedder, Embedder)
        assert embedder.name == name and embedder.dim == 128
    sha = model_registry.model_info("facenet_keras")["sha256"]
    assert get_embedder("facenet").model_id.startswith(f"facenet:{sha[:12]}:")
    assert get_embedder("dlib").model_id.startswith("dlib:55533b28a958:")
    with pytest.raises(ValueError, match="facenet, dlib"):
        get_embedder("arcface")


def test_import_does_not_load_tensorflow() -> None:
    code = (
        "import sys, preprocessing\n"
        "e = preprocessing.get_embedder('facenet'); _ = e.model_id\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TensorFlow imported eagerly'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_embeddings_shape_norm_dtype(backend: str, lfw10: Path) -> None:
    embedder = get_embedder(backend)
    image = load_image_file(lfw10 / REFERENCE_IMAGE)
    faces = detect_faces(image)
    crops = embedder.crops(image, faces)
    size = 160 if backend == "facenet" else 150
    assert len(crops) == len(faces) and crops[0].shape == (size, size, 3) and crops[0].dtype == np.uint8
    emb = embedder.embed(image, faces)
    assert emb.shape == (len(faces), 128) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embedder.embed_crops(crops), emb, atol=1e-6)
    assert embedder.embed(image, []).shape == (0, 128)
    assert embedder.embed_crops([]).shape == (0, 128)
    with pytest.raises(ValueError, match=str(size)):
        embedder.embed_crops([np.zeros((size + 1, size + 1, 3), np.uint8)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_person_closer_than_different_person(backend: str, pair_embeddings: dict) -> None:
    emb, labels = pair_embeddings[backend]
    labels_arr = np.array(labels)
    dist = np.linalg.norm(emb[:, None] - emb[None], axis=2)
    same = labels_arr[:, None] == labels_arr[None]
    off_diag = ~np.eye(len(labels), dtype=bool)
    intra = dist[same & off_diag]
    inter = dist[~same]
    assert intra.mean() < 0.75 * inter.mean()
    # Every triplet (anchor, same person, other person): the same person is closer.
    violations = [
        (labels[a], labels[n])
        for a in range(len(labels))
        for p in np.flatnonzero(same[a] & off_diag[a])
        for n in np.flatnonzero(~same[a])
        if dist[a, p] >= dist[a, n]
    ]
    assert not violations, f"{backend}: same-person pair farther than a different-person pair: {violations[:5]}"
    np.fill_diagonal(dist, np.inf)
    assert (labels_arr[dist.argmin(axis=1)] == labels_arr).all()


def test_face_encodings(lfw10: Path) -> None:
    image = load_image_file(lfw10 / REFERENCE_IMAGE)
    encodings = face_encodings(image)
    faces = detect_faces(image)
    assert len(encodings) == len(faces) >= 1
    np.testing.assert_allclose(encodings[0], get_embedder("facenet").embed(image, faces[:1])[0], atol=1e-6)
    dlib_encodings = face_encodings(image, faces[:1], backend="dlib")
    assert len(dlib_encodings) == 1 and dlib_encodings[0].shape == (128,)
    assert face_encodings(np.full((120, 120, 3), 128, np.uint8)) == []
    assert face_encodings(image, faces=[]) == []
    with pytest.raises(ValueError, match="facenet, dlib"):
        face_encodings(image, backend="openface")


# --- stable embeddings --------------------------------------------------------------------
def _reference_entry(backend: str, lfw10: Path) -> dict:
    embedder = get_embedder(backend)
    image = load_image_file(lfw10 / REFERENCE_IMAGE)
    face = detect_faces(image)[0]
    vector = embedder.embed(image, [face])[0]
    return {
        "model_id": embedder.model_id,
        "location": list(face.location),
        "vector": [round(float(v), 7) for v in vector],
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_is_stable(backend: str, lfw10: Path) -> None:
    stored = json.loads(REFERENCE.read_text())
    assert stored["image"] == f"lfw10/{REFERENCE_IMAGE}"
    expected = stored["backends"][backend]
    current = _reference_entry(backend, lfw10)
    assert current["model_id"] == expected["model_id"], (
        "the model or crop recipe changed; if intended, run: python tests/test_embedders.py --write-reference"
    )
    assert current["location"] == expected["location"]
    np.testing.assert_allclose(current["vector"], expected["vector"], atol=1e-4)


# --- FaceNet rebuild ----------------------------------------------------------------------
def _inbound(layer) -> list[str]:  # noqa: ANN001
    if not layer._inbound_nodes:
        return []
    return [t._keras_history.operation.name for t in layer._inbound_nodes[0].input_tensors]


def test_facenet_structure_matches_h5_config(facenet_module, h5_config: dict) -> None:  # noqa: ANN001
    model = facenet_module.build_model()
    ours = {layer.name: layer for layer in model.layers}
    theirs = {entry["name"]: entry for entry in h5_config["config"]["layers"]}
    assert set(ours) == set(theirs)
    assert len(model.layers) == len(theirs) == 426
    assert [o.name for o in model.inputs] == ["input_1"] or model.layers[0].name == "input_1"
    assert model.output_shape == (None, 128) and model.input_shape == (None, 160, 160, 3)
    assert h5_config["config"]["output_layers"][0][0] == model.layers[-1].name == "Bottleneck_BatchNorm"

    for name, entry in theirs.items():
        layer, cfg = ours[name], entry["config"]
        kind = entry["class_name"]
        expected_kind = "ScaleSum" if kind == "Lambda" else kind
        assert type(layer).__name__ == expected_kind, name
        file_inputs = [node[0] for node in entry["inbound_nodes"][0]] if entry["inbound_nodes"] else []
        assert _inbound(layer) == file_inputs, f"{name}: wired to {_inbound(layer)}, file says {file_inputs}"
        if kind == "Conv2D":
            assert layer.filters == cfg["filters"], name
            assert list(layer.kernel_size) == cfg["kernel_size"], name
            assert list(layer.strides) == cfg["strides"], name
            assert layer.padding == cfg["padding"], name
            assert layer.use_bias == cfg["use_bias"], name
            assert list(layer.dilation_rate) == cfg["dilation_rate"], name
            assert layer.activation.__name__ == cfg["activation"], name
        elif kind == "BatchNormalization":
            assert layer.epsilon == cfg["epsilon"] and layer.momentum == cfg["momentum"], name
            assert layer.scale == cfg["scale"] and layer.center == cfg["center"], name
            assert layer.axis in (cfg["axis"], cfg["axis"] % 4 if cfg["axis"] >= 0 else 1), name
        elif kind == "Activation":
            assert layer.activation.__name__ == cfg["activation"], name
        elif kind == "MaxPooling2D":
            assert list(layer.pool_size) == cfg["pool_size"] and list(layer.strides) == cfg["strides"], name
            assert layer.padding == cfg["padding"], name
        elif kind == "Concatenate":
            assert layer.axis in (cfg["axis"], -1), name
        elif kind == "Lambda":
            assert layer.scale == pytest.approx(cfg["arguments"]["scale"]), name
        elif kind == "Dense":
            assert layer.units == cfg["units"] and layer.use_bias == cfg["use_bias"], name
            assert layer.activation.__name__ == cfg["activation"], name
        elif kind == "Dropout":
            assert layer.rate == pytest.approx(cfg["rate"]), name


def test_scale_sum_layer_serialises(facenet_module) -> None:  # noqa: ANN001
    import keras

    layer = facenet_module.ScaleSum(0.17, name="Block35_1_ScaleSum")
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(clone) is facenet_module.ScaleSum and clone.scale == pytest.approx(0.17) and clone.name == layer.name
    out = clone([np.ones((1, 2), np.float32), np.full((1, 2), 10.0, np.float32)])
    np.testing.assert_allclose(np.asarray(out), [[2.7, 2.7]], rtol=1e-6)


def test_loaded_weights_equal_file(facenet_module) -> None:  # noqa: ANN001
    model = facenet_module.load_model()
    assert model is facenet_module.load_model()
    with h5py.File(model_registry.model_path("facenet_keras"), "r") as fh:
        group = fh["model_weights"]
        for name, key in [("Bottleneck", "Bottleneck/kernel:0"),
                          ("Block8_6_Conv2d_1x1", "Block8_6_Conv2d_1x1/bias:0"),
                          ("Conv2d_1a_3x3_BatchNorm", "Conv2d_1a_3x3_BatchNorm/moving_variance:0")]:
            stored = np.asarray(group[name][key])
            weights = {w.path.split("/")[-1]: np.asarray(w) for w in model.get_layer(name).weights}
            np.testing.assert_array_equal(weights[key.split("/")[-1].split(":")[0]], stored)


def test_prewhiten(facenet_module) -> None:  # noqa: ANN001
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 160, 160, 3)).astype(np.uint8)
    white = facenet_module.prewhiten(x)
    assert white.dtype == np.float32
    np.testing.assert_allclose(white.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(white.std(axis=(1, 2, 3)), 1.0, atol=1e-4)
    flat = facenet_module.prewhiten(np.full((160, 160, 3), 9, np.uint8))
    assert np.isfinite(flat).all() and np.abs(flat).max() == 0.0


def _tiny_model(facenet_module):  # noqa: ANN001, ANN202
    import keras

    inputs = keras.Input((8, 8, 3), name="input_1")
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="Conv2d_1a_3x3")(inputs)
    x = keras.layers.BatchNormalization(scale=False, name="Conv2d_1a_3x3_BatchNorm")(x)
    return keras.Model(inputs, x)


def _write_h5(path: Path, layers: dict[str, dict[str, np.ndarray]]) -> None:
    with h5py.File(path, "w") as fh:
        group = fh.create_group("model_weights")
        group.attrs["layer_names"] = [name.encode() for name in layers]
        for name, weights in layers.items():
            sub = group.create_group(name)
            sub.attrs["weight_names"] = [f"{name}/{w}:0".encode() for w in weights]
            for w, value in weights.items():
                sub.create_dataset(f"{name}/{w}:0", data=value)


def _good_layers() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return {
        "Conv2d_1a_3x3": {"kernel": rng.normal(size=(3, 3, 3, 4)).astype(np.float32)},
        "Conv2d_1a_3x3_BatchNorm": {
            "beta": rng.normal(size=4).astype(np.float32),
            "moving_mean": rng.normal(size=4).astype(np.float32),
            "moving_variance": rng.uniform(0.5, 2, size=4).astype(np.float32),
        },
        "Activation_without_weights": {},
    }


def test_load_weights_by_name(facenet_module, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "ok.h5"
    layers = _good_layers()
    _write_h5(path, layers)
    model = _tiny_model(facenet_module)
    facenet_module.load_weights(model, path)
    np.testing.assert_array_equal(np.asarray(model.get_layer("Conv2d_1a_3x3").kernel),
                                  layers["Conv2d_1a_3x3"]["kernel"])
    bn = model.get_layer("Conv2d_1a_3x3_BatchNorm")
    np.testing.assert_array_equal(np.asarray(bn.moving_variance), layers["Conv2d_1a_3x3_BatchNorm"]["moving_variance"])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda layers: layers["Conv2d_1a_3x3"].update(kernel=np.zeros((3, 3, 3, 5), np.float32)), r"shape \(3, 3, 3, 5\)"),
        (lambda layers: layers.update(Extra_Conv={"kernel": np.zeros((1, 1, 1, 1), np.float32)}), "not in the model"),
        (lambda layers: layers.pop("Conv2d_1a_3x3_BatchNorm"), "no weights in the file"),
        (lambda layers: layers["Conv2d_1a_3x3_BatchNorm"].pop("moving_mean"), "lacks weight 'moving_mean'"),
        (lambda layers: layers["Conv2d_1a_3x3_BatchNorm"].update(gamma=np.ones(4, np.float32)), "unused weights"),
    ],
)
def test_load_weights_mismatch(facenet_module, tmp_path: Path, damage, message: str) -> None:  # noqa: ANN001
    layers = _good_layers()
    damage(layers)
    path = tmp_path / "bad.h5"
    _write_h5(path, layers)
    with pytest.raises(ModelFileError, match=message) as info:
        facenet_module.load_weights(_tiny_model(facenet_module), path)
    assert str(path) in str(info.value)


def test_load_weights_not_hdf5(facenet_module, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "garbage.h5"
    path.write_bytes(b"not hdf5")
    with pytest.raises(ModelFileError, match="HDF5"):
        facenet_module.load_weights(_tiny_model(facenet_module), path)


# --- model files -------------------------------------------------------------------------
def test_model_paths_verify() -> None:
    for key in ("facenet_keras", "shape_predictor_5", "shape_predictor_68", "mmod_detector", "dlib_resnet"):
        path = model_registry.model_path(key)
        assert path.is_file() and path.name == model_registry.model_info(key)["file"]
    assert model_registry.models_dir() == REPO / "models" or os.environ.get("FACE_MODELS_DIR")


def test_unknown_model_key() -> None:
    with pytest.raises(ValueError, match="dlib_resnet, facenet_keras, mmod_detector, shape_predictor_5, shape_predictor_68"):
        model_registry.model_path("vgg_face")


def test_wrong_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACE_MODELS_DIR", str(tmp_path))
    assert model_registry.models_dir() == tmp_path.resolve()
    info = model_registry.model_info("facenet_keras")
    path = tmp_path / "facenet_keras.h5"

    with pytest.raises(ModelFileError, match="not found") as missing:
        model_registry.model_path("facenet_keras")
    assert str(path) in str(missing.value) and info["get"] in str(missing.value)

    path.write_bytes(b"garbage instead of weights")
    with pytest.raises(ModelFileError) as wrong:
        model_registry.model_path("facenet_keras")
    message = str(wrong.value)
    assert str(path) in message and info["sha256"] in message and "invoke fetch-models" in message

    # A good file passes; replacing it afterwards is noticed (the cache is per path+mtime+size).
    path.unlink()
    path.symlink_to(REPO / "models" / "facenet_keras.h5")
    assert model_registry.model_path("facenet_keras") == path
    path.unlink()
    path.write_bytes(b"x" * 100)
    with pytest.raises(ModelFileError, match="wrong sha256"):
        model_registry.model_path("facenet_keras")


def test_facenet_embedder_reports_bad_model_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A corrupt h5 stops the FaceNet backend with the model error, not a TensorFlow traceback."""
    from preprocessing import facenet

    monkeypatch.setenv("FACE_MODELS_DIR", str(tmp_path))
    (tmp_path / "facenet_keras.h5").write_bytes(b"garbage")
    monkeypatch.setattr(facenet, "_model", None)
    with pytest.raises(ModelFileError, match="facenet_keras.h5"):
        facenet.load_model()


def _write_reference() -> None:
    faces = Path(os.environ.get("FACES_DIR", REPO.parent / "shared" / "faces")).resolve()
    data = {
        "image": f"lfw10/{REFERENCE_IMAGE}",
        "note": "full pipeline (load, HOG detect upsample=1, align, embed); tolerance 1e-4",
        "backends": {backend: _reference_entry(backend, faces / "lfw10") for backend in BACKENDS},
    }
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-reference"]:
        _write_reference()
    else:
        sys.exit("usage: python tests/test_embedders.py --write-reference")
