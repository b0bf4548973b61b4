"""Client-side fixed-point encoding and additive sharing mod 2^64."""
from __future__ import annotations

import json

import numpy as np
import pytest

from preprocessing import sharing
from preprocessing.sharing import FRAC_BITS, SharingError


def test_encode_decode_round_trip_including_negatives():
    v = np.array([-1.0, -0.5, -1e-5, 0.0, 0.123456, 1.0, 1000.25])
    back = sharing.decode_fixed(sharing.encode_fixed(v))
    assert np.max(np.abs(back - v)) <= 2 ** -(FRAC_BITS + 1)
    assert sharing.encode_fixed(np.array([-1.0]))[0] == (1 << 64) - (1 << FRAC_BITS)


def test_integer_encoding_with_zero_fractional_bits():
    v = np.array([0, 1, 5, -3])
    assert sharing.encode_fixed(v, 0).view(np.int64).tolist() == [0, 1, 5, -3]


@pytest.mark.parametrize("bad", [np.nan, np.inf, 2.0 ** 15])
def test_encode_rejects_unencodable_values(bad):
    with pytest.raises(SharingError, match="NaN|range"):
        sharing.encode_fixed(np.array([0.1, bad]))


def test_shares_reconstruct_and_each_share_differs_from_secret():
    x = sharing.encode_fixed(np.linspace(-1, 1, 1000))
    s0, s1 = sharing.share(x)
    assert np.array_equal(sharing.reconstruct(s0, s1), x)
    assert np.mean(s0 == x) < 0.01 and np.mean(s1 == x) < 0.01
    t0, _ = sharing.share(x)
    assert np.mean(t0 == s0) < 0.01  # fresh randomness every time


def test_shares_of_a_constant_vector_look_uniform():
    x = sharing.encode_fixed(np.full(20000, 0.25))
    for s in sharing.share(x):
        bits = np.unpackbits(s.view(np.uint8))
        assert abs(bits.mean() - 0.5) < 0.01
        # every one of the 64 bit positions is balanced, the top bits included
        per_pos = np.array([((s >> np.uint64(k)) & np.uint64(1)).mean() for k in range(64)])
        assert np.all(np.abs(per_pos - 0.5) < 0.03), per_pos
        # byte values are spread evenly (chi-square against uniform, 255 dof; 99.9% quantile ~ 330)
        counts = np.bincount(s.view(np.uint8), minlength=256)
        expected = counts.sum() / 256
        assert ((counts - expected) ** 2 / expected).sum() < 330
        assert len(np.unique(s)) == len(s)


def test_reconstruct_rejects_mismatched_shapes():
    with pytest.raises(SharingError, match="shapes"):
        sharing.reconstruct(np.zeros(3, np.uint64), np.zeros(4, np.uint64))


def test_share_bundle_layout_and_manifest(tmp_path):
    x = np.random.default_rng(1).normal(size=(5, 3)) * 0.1
    y = np.eye(3, dtype=np.int64)[[0, 1, 2, 0, 1]]
    dests = (tmp_path / "s0", tmp_path / "s1")
    ms = sharing.write_share_bundle([(x, FRAC_BITS), (y, 0)], dests, program="p", program_version="v",
                                    kind="train", n=5, d=3, n_classes=3, run_id="r1")
    blobs = [(d / f"Input-Binary-P{i}-0").read_bytes() for i, d in enumerate(dests)]
    assert all(len(b) == 8 * (15 + 15) for b in blobs)
    total = sharing.reconstruct(*(np.frombuffer(b, "<u8") for b in blobs))
    assert np.allclose(sharing.decode_fixed(total[:15]).reshape(5, 3), x, atol=2 ** -16)
    assert np.array_equal(total[15:].view(np.int64).reshape(5, 3), y)
    for i, d in enumerate(dests):
        meta = json.loads((d / "manifest.json").read_text())
        assert meta["party"] == i and meta["n_values"] == 30 and meta["frac_bits"] == FRAC_BITS
        assert sharing.ShareManifest.load(d / "manifest.json") == ms[i]
    assert sorted(p.name for p in dests[0].iterdir()) == ["Input-Binary-P0-0", "manifest.json"]


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(SharingError, match="manifest missing"):
        sharing.ShareManifest.load(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(SharingError, match=str(tmp_path)):
        sharing.ShareManifest.load(tmp_path / "manifest.json")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    sharing.atomic_write_bytes(tmp_path / "a.bin", b"123")
    sharing.atomic_write_bytes(tmp_path / "a.bin", b"45")
    assert (tmp_path / "a.bin").read_bytes() == b"45"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]
