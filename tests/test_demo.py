"""The demo's default dataset: scikit-learn's LFW loader turned into a gallery folder (loader faked: no network)."""
from __future__ import annotations

import types

import numpy as np
from PIL import Image


def test_lfw_sample_writes_a_gallery(tmp_path, monkeypatch):
    import sklearn.datasets

    from orchestration.client.demo import lfw_sample

    rng = np.random.default_rng(0)
    fake = types.SimpleNamespace(
        images=rng.random((7, 250, 250, 3), dtype=np.float32),  # scikit-learn gives floats in [0, 1]
        target=np.array([0, 1, 0, 2, 1, 0, 2]),
        target_names=np.array(["Ann Smith", "Bob Jones", "Cy Young"]),
    )
    seen = {}

    def fetch(**kwargs):
        seen.update(kwargs)
        return fake

    monkeypatch.setattr(sklearn.datasets, "fetch_lfw_people", fetch)
    out = lfw_sample(tmp_path / "g", min_faces=2, people=2)
    assert seen["resize"] == 1.0 and seen["color"] is True and seen["slice_"] is None
    assert sorted(p.name for p in out.iterdir()) == ["Ann_Smith", "Bob_Jones"]
    files = sorted((out / "Ann_Smith").iterdir())
    assert [f.name for f in files] == ["Ann_Smith_0001.png", "Ann_Smith_0002.png", "Ann_Smith_0003.png"]
    with Image.open(files[0]) as im:
        assert im.size == (250, 250) and im.mode == "RGB"
        assert np.asarray(im).max() > 200  # rescaled to 0..255, not left at 0..1
