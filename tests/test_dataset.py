"""Gallery scanning, cached embedding, skip policy, save/load and diff (real LFW images)."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from preprocessing.dataset import (
    GalleryEmbeddings,
    GalleryError,
    diff_galleries,
    embed_gallery,
    scan_gallery,
)
from preprocessing.embedders import get_embedder
from preprocessing.errors import PreprocessingError
from preprocessing.faces import detect_faces
from preprocessing.images import load_image_file

PEOPLE = ("Colin_Powell", "George_W_Bush", "Tony_Blair")


def _copy(lfw10: Path, dest: Path, person: str, numbers: list[int], folder: str | None = None) -> None:
    target = dest / (folder or person)
    target.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        shutil.copy(lfw10 / person / f"{person}_{n:04d}.jpg", target / f"{person}_{n:04d}.jpg")


@pytest.fixture()
def small_gallery(tmp_path: Path, lfw10: Path) -> Path:
    """3 people x 2 images (copies in a temp dir)."""
    root = tmp_path / "gallery"
    for person in PEOPLE:
        _copy(lfw10, root, person, [1, 2])
    return root


# --- scan_gallery -------------------------------------------------------------------
def test_scan_gallery_layout(tmp_path: Path, lfw10: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "g"
    _copy(lfw10, root, "Tony_Blair", [1])
    src = lfw10 / "Colin_Powell" / "Colin_Powell_0001.jpg"
    (root / "Colin_Powell").mkdir()
    shutil.copy(src, root / "Colin_Powell" / "b.JPG")
    shutil.copy(src, root / "Colin_Powell" / "a.Jpeg")
    shutil.copy(src, root / "Colin_Powell" / "c.png")  # a JPEG named .png: the loader sniffs the content
    shutil.copy(src, root / "Colin_Powell" / ".hidden.jpg")
    (root / "Colin_Powell" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    shutil.copy(src, root / ".cache" / "x.jpg")
    shutil.copy(src, root / "stray.jpg")
    (root / "Nobody").mkdir()

    with caplog.at_level(logging.WARNING, logger="preprocessing.dataset"):
        items = scan_gallery(root)
    assert [(p, f.name) for p, f in items] == [
        ("Colin_Powell", "a.Jpeg"),
        ("Colin_Powell", "b.JPG"),
        ("Colin_Powell", "c.png"),
        ("Tony_Blair", "Tony_Blair_0001.jpg"),
    ]
    assert all(f.parent.name == p for p, f in items)
    assert "stray.jpg" in caplog.text  # files in the root are named in a warning
    assert "Nobody" in caplog.text  # person without images


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_scan_gallery_errors(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "g"
    if kind == "file":
        root.write_text("x")
    elif kind == "empty":
        root.mkdir()
        (root / "loose.jpg").write_bytes(b"x")
    with pytest.raises(GalleryError) as info:
        scan_gallery(root)
    assert str(root) in str(info.value)
    assert isinstance(info.value, PreprocessingError)


# --- caching ----------------------------------------------------------------------
def test_cache_second_run_embeds_nothing_and_change_reembeds_one(
    small_gallery: Path, tmp_path: Path, lfw10: Path
) -> None:
    cache = tmp_path / "cache"
    first = embed_gallery(small_gallery, "dlib", cache_dir=cache, progress=False, batch_size=4)
    assert (first.n_embedded, first.n_cached) == (6, 0)
    assert first.embeddings.shape == (6, 128) and first.embeddings.dtype == np.float32
    assert first.classes == list(PEOPLE)
    assert first.label_indices().tolist() == [0, 0, 1, 1, 2, 2]
    assert first.skipped == []

    # batching (batch_size=4 over 6 images) gives the same vectors as embedding one image alone
    embedder = get_embedder("dlib")
    image = load_image_file(first.paths[5])
    alone = embedder.embed(image, detect_faces(image)[:1])[0]
    np.testing.assert_allclose(first.embeddings[5], alone, atol=1e-5)

    second = embed_gallery(small_gallery, "dlib", cache_dir=cache, progress=False)
    assert (second.n_embedded, second.n_cached) == (0, 6)
    np.testing.assert_array_equal(second.embeddings, first.embeddings)
    assert second.labels == first.labels and second.paths == first.paths

    # new bytes under an old name: exactly that image is embedded again
    changed = small_gallery / "Tony_Blair" / "Tony_Blair_0002.jpg"
    shutil.copy(lfw10 / "Tony_Blair" / "Tony_Blair_0003.jpg", changed)
    third = embed_gallery(small_gallery, "dlib", cache_dir=cache, progress=False)
    assert (third.n_embedded, third.n_cached) == (1, 5)
    assert not np.allclose(third.embeddings[5], first.embeddings[5])
    np.testing.assert_array_equal(third.embeddings[:5], first.embeddings[:5])

    diff = third.diff_against(first)
    assert diff.images_changed == ["Tony_Blair/Tony_Blair_0002.jpg"]
    assert not diff.images_added and not diff.persons_added and not diff.model_changed


def test_cache_is_keyed_by_backend_and_detector_settings(small_gallery: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    dlib_run = embed_gallery(small_gallery, "dlib", cache_dir=cache, progress=False)
    assert dlib_run.n_embedded == 6

    facenet_run = embed_gallery(small_gallery, "facenet", cache_dir=cache, progress=False)
    assert (facenet_run.n_embedded, facenet_run.n_cached) == (6, 0)
    assert facenet_run.model_id != dlib_run.model_id
    assert facenet_run.embeddings.shape == (6, 128)
    np.testing.assert_allclose(np.linalg.norm(facenet_run.embeddings, axis=1), 1.0, atol=1e-4)
    # FaceNet embeddings separate the people: each image's nearest other image is the same person
    sims = facenet_run.embeddings @ facenet_run.embeddings.T
    np.fill_diagonal(sims, -np.inf)
    labels = np.array(facenet_run.labels)
    assert (labels[sims.argmax(axis=1)] == labels).all()
    assert facenet_run.diff_against(dlib_run).model_changed

    again = embed_gallery(small_gallery, "facenet", cache_dir=cache, progress=False)
    assert (again.n_embedded, again.n_cached) == (0, 6)
    other_min_size = embed_gallery(small_gallery, "dlib", cache_dir=cache, progress=False, min_size=41)
    assert other_min_size.n_embedded == 6


# --- skip policy --------------------------------------------------------------------
def _bad_files_gallery(root: Path, lfw10: Path) -> dict[str, Path]:
    _copy(lfw10, root, "George_W_Bush", [1, 2])
    person = root / "George_W_Bush"
    jpeg = (lfw10 / "George_W_Bush" / "George_W_Bush_0003.jpg").read_bytes()
    files = {
        "truncated": person / "truncated.jpg",
        "text": person / "text.jpg",
        "noface": person / "noise.png",
        "tiny": person / "tiny.png",
        "several": root / "Tony_Blair" / "pair.png",
    }
    files["truncated"].write_bytes(jpeg[: len(jpeg) // 3])
    files["text"].write_text("this is not a picture\n")
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8), (0, 0), 3)
    assert cv2.imwrite(str(files["noface"]), noise)
    face = cv2.imread(str(lfw10 / "George_W_Bush" / "George_W_Bush_0004.jpg"))
    assert cv2.imwrite(str(files["tiny"]), cv2.resize(face, (125, 125), interpolation=cv2.INTER_AREA))
    # two faces: Tony Blair at full size, Colin Powell smaller beside him
    big = cv2.imread(str(lfw10 / "Tony_Blair" / "Tony_Blair_0001.jpg"))
    small = np.zeros_like(big)
    small[25:225, 25:225] = cv2.resize(cv2.imread(str(lfw10 / "Colin_Powell" / "Colin_Powell_0001.jpg")), (200, 200))
    files["several"].parent.mkdir()
    assert cv2.imwrite(str(files["several"]), np.concatenate([small, big], axis=1))
    # a person whose only image is unusable is dropped
    (root / "Ghost").mkdir()
    (root / "Ghost" / "ghost.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    return files


def test_skipped_files_summary(tmp_path: Path, lfw10: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "g"
    files = _bad_files_gallery(root, lfw10)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="preprocessing.dataset"):
        result = embed_gallery(root, "dlib", cache_dir=cache, progress=False, min_size=80)

    assert result.classes == ["George_W_Bush", "Tony_Blair"]  # Ghost dropped
    assert [p.name for p in result.paths] == ["George_W_Bush_0001.jpg", "George_W_Bush_0002.jpg", "pair.png"]
    reasons = {path.name: reason for path, reason in result.skipped}
    assert set(reasons) == {"ghost.jpg", "noise.png", "text.jpg", "tiny.png", "truncated.jpg"}
    assert reasons["noise.png"] == "no face found"
    assert reasons["tiny.png"] == "face too small (<80 px)"
    for name in ("text.jpg", "truncated.jpg", "ghost.jpg"):
        assert name in reasons[name]  # ImageLoadError message names the file
    assert "not a recognised image format" in reasons["text.jpg"]
    assert "pair.png: 2 faces found, using the largest" in caplog.text
    assert "'Ghost'" in caplog.text
    summary = result.skipped_summary()
    assert "5 file(s) skipped" in summary and "1 no face found" in summary and "3 unreadable" in summary

    assert str(files["text"]) + ": " + str(files["text"]) not in summary  # path not repeated

    # the several-faces image is embedded from its largest face (Tony Blair, not Colin Powell)
    image = load_image_file(files["several"])
    faces = detect_faces(image, min_size=80)
    assert len(faces) == 2 and faces[0].location[3] >= 250  # largest first, on the right half
    np.testing.assert_allclose(result.embeddings[2], get_embedder("dlib").embed(image, faces[:1])[0], atol=1e-5)

    # negative results (no face / too small) come from the cache; load errors are found again
    again = embed_gallery(root, "dlib", cache_dir=cache, progress=False, min_size=80)
    assert again.n_embedded == 0 and again.n_cached == 5  # 3 embedded + noise + tiny
    assert dict((p.name, r) for p, r in again.skipped) == reasons


def test_nothing_usable_raises_with_summary(tmp_path: Path) -> None:
    root = tmp_path / "g"
    (root / "Ann").mkdir(parents=True)
    (root / "Ann" / "a.jpg").write_text("text")
    assert cv2.imwrite(str(root / "Ann" / "b.png"), np.full((120, 120, 3), 200, np.uint8))
    with pytest.raises(GalleryError) as info:
        embed_gallery(root, "dlib", progress=False)
    message = str(info.value)
    assert str(root) in message and "no usable face image" in message
    assert "a.jpg" in message and "b.png: no face found" in message


# --- save / load ---------------------------------------------------------------------
def test_save_load_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    gallery = GalleryEmbeddings(
        embeddings=rng.normal(size=(3, 4)).astype(np.float32),
        labels=["Zoë", "Ann", "Zoë"],
        paths=[Path("/g/Zoë/1.jpg"), Path("/g/Ann/1.jpg"), Path("/g/Zoë/2.png")],
        digests=["a" * 64, "b" * 64, "c" * 64],
        model_id="dlib:test",
        detector="hog/upsample=1/min_size=40",
        root=Path("/g"),
        skipped=[(Path("/g/Ann/x.jpg"), "no face found")],
        n_cached=2,
        n_embedded=1,
    )
    out = tmp_path / "client" / "gallery.npz"
    gallery.save(out)
    assert [p.name for p in out.parent.iterdir()] == ["gallery.npz"]  # no temp file left behind
    loaded = GalleryEmbeddings.load(out)
    np.testing.assert_array_equal(loaded.embeddings, gallery.embeddings)
    assert loaded.embeddings.dtype == np.float32
    for attr in ("labels", "paths", "digests", "model_id", "detector", "root", "skipped", "n_cached", "n_embedded"):
        assert getattr(loaded, attr) == getattr(gallery, attr), attr
    assert loaded.classes == ["Ann", "Zoë"]
    assert loaded.label_indices().tolist() == [1, 0, 1]

    # overwrite in place, then corrupt files are reported by name
    gallery.save(out)
    assert GalleryEmbeddings.load(out).labels == gallery.labels
    out.write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(GalleryError, match="gallery.npz"):
        GalleryEmbeddings.load(out)
    with pytest.raises(GalleryError, match="missing.npz"):
        GalleryEmbeddings.load(tmp_path / "missing.npz")


def test_diff_against_previous() -> None:
    def make(items: list[tuple[str, str, str]]) -> GalleryEmbeddings:
        return GalleryEmbeddings(
            embeddings=np.zeros((len(items), 2), np.float32),
            labels=[p for p, _, _ in items],
            paths=[Path("/g") / p / f for p, f, _ in items],
            digests=[d for _, _, d in items],
            model_id="m",
        )

    old = make([("Ann", "1.jpg", "a1"), ("Ann", "2.jpg", "a2"), ("Bob", "1.jpg", "b1")])
    new = make([("Ann", "1.jpg", "a1"), ("Ann", "2.jpg", "A2"), ("Ann", "3.jpg", "a3"), ("Cy", "1.jpg", "c1")])
    diff = new.diff_against(old)
    assert diff.persons_added == ["Cy"] and diff.persons_removed == ["Bob"]
    assert diff.images_added == ["Ann/3.jpg", "Cy/1.jpg"]
    assert diff.images_removed == ["Bob/1.jpg"]
    assert diff.images_changed == ["Ann/2.jpg"]
    assert diff and not diff.model_changed
    assert "persons added (1): Cy" in diff.summary() and str(diff) == diff.summary()

    assert not make([("Ann", "1.jpg", "a1")]).diff_against(make([("Ann", "1.jpg", "a1")]))
    first = diff_galleries(None, new)
    assert first.first_run and first.persons_added == ["Ann", "Cy"]


class _RecordingEmbedder:
    """Wraps the dlib embedder: records the thread of every batch, and can fail on the n-th batch."""

    def __init__(self, fail_on: int | None = None) -> None:
        from preprocessing import get_embedder

        self.inner = get_embedder("dlib")
        self.name, self.dim, self.model_id = self.inner.name, self.inner.dim, self.inner.model_id
        self.threads: list[str] = []
        self.fail_on = fail_on

    def crops(self, image, faces):  # type: ignore[no-untyped-def]
        return self.inner.crops(image, faces)

    def embed_crops(self, crops):  # type: ignore[no-untyped-def]
        import threading

        self.threads.append(threading.current_thread().name)
        if self.fail_on is not None and len(self.threads) == self.fail_on:
            raise RuntimeError("embedder failed on purpose")
        return self.inner.embed_crops(crops)


def test_overlapped_batches_keep_every_embedding_with_its_image(small_gallery: Path, tmp_path: Path) -> None:
    """Batches run on a worker thread while detection goes on: each row must still be its own image's
    embedding (the same as one batch of everything), whatever the batch size."""
    whole = embed_gallery(small_gallery, "dlib", progress=False, batch_size=64)
    rec = _RecordingEmbedder()
    split = embed_gallery(small_gallery, embedder=rec, progress=False, batch_size=2)
    assert split.paths == whole.paths
    np.testing.assert_allclose(split.embeddings, whole.embeddings, atol=1e-5)
    assert len(rec.threads) == -(-len(whole) // 2)  # ceil: every batch ran, each once
    assert all(t.startswith("embed") for t in rec.threads), rec.threads  # on the worker, not this thread


def test_failed_batch_raises_and_caches_nothing_of_it(small_gallery: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="on purpose"):
        embed_gallery(small_gallery, embedder=_RecordingEmbedder(fail_on=2), cache_dir=cache, progress=False,
                      batch_size=2)
    # only the first batch's two embeddings reached the cache (no-face entries aside)
    again = embed_gallery(small_gallery, "dlib", cache_dir=cache, progress=False)
    assert again.n_embedded == len(again) - 2
