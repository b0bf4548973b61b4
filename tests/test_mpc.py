"""The real protocol: two semi2k parties train and recognise on shares.

These tests need MP-SPDZ (MP_SPDZ_HOME or /opt/mp-spdz). Without it they FAIL with the
installation hint: a run that skipped the protocol would prove nothing.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from orchestration.shared import reference
from orchestration.mpspdz.launcher import PartyFailed
from orchestration.mpspdz.toolchain import MPSPDZError, find_mpspdz
from orchestration.client.private import UNKNOWN, Layout, ModelError, predict_private, train_private
from preprocessing import sharing

pytestmark = pytest.mark.mpc

PARAMS = reference.TrainParams(epochs=1, batch=32, lr=1.0, alpha=32.0, exp_bits=7, seed=3)


@pytest.fixture(scope="session")
def lfw10_split(lfw10, tmp_path_factory):
    """dlib embeddings of lfw10: 7 images per person to train, 3 held out (seeded)."""
    from preprocessing.dataset import embed_gallery

    g = embed_gallery(lfw10, backend="dlib", detector="hog", cache_dir=tmp_path_factory.mktemp("cache"),
                      progress=False)
    rng = np.random.default_rng(0)
    labels = np.array(g.labels)
    train_idx, test_idx = [], []
    for name in g.classes:
        idx = np.flatnonzero(labels == name)
        rng.shuffle(idx)
        test_idx += list(idx[:3])
        train_idx += list(idx[3:])
    return g, np.array(train_idx), np.array(test_idx)


@pytest.fixture(scope="session")
def trained(mp, lfw10_split, tmp_path_factory):
    g, tr, te = lfw10_split
    layout = Layout(tmp_path_factory.mktemp("var"))
    report = train_private(mp, layout, g.embeddings[tr], [g.labels[i] for i in tr], PARAMS, timeout=600)
    return layout, report


def _reference(g, tr, classes):
    idx = {n: k for k, n in enumerate(classes)}
    return reference.train(g.embeddings[tr], np.array([idx[g.labels[i]] for i in tr]), len(classes), PARAMS)


def test_mpc_agrees_with_plaintext_reference(mp, trained, lfw10_split):
    g, tr, te = lfw10_split
    layout, report = trained
    rep = predict_private(mp, layout, g.embeddings[te], threshold=-1e9)  # a logit below every z_max: all named
    mpc = np.array([p.label for p in rep.predictions])
    conf = np.array([p.confidence for p in rep.predictions])
    w = _reference(g, tr, report.classes)
    ref, ref_conf = reference.predict(w, g.embeddings[te], PARAMS.exp_bits)
    # the score z_max: the reference on the very model the servers hold (their shares reconstructed) to within
    # fixed-point rounding; against the float64-trained model as close as the trained weights are
    from orchestration.client.private import _read_shares

    d1, c = g.embeddings.shape[1] + 1, len(report.classes)
    held = sharing.decode_fixed(sharing.reconstruct(*[
        _read_shares(layout.model_dir(i) / f"Transactions-P{i}.data", 0, d1 * c) for i in range(2)])).reshape(d1, c)
    score = np.array([p.score for p in rep.predictions])
    assert np.max(np.abs(score - reference.predict_scores(held, g.embeddings[te], PARAMS.exp_bits)[2])) <= 2 ** -10
    assert np.max(np.abs(score - reference.predict_scores(w, g.embeddings[te], PARAMS.exp_bits)[2])) < 0.05 * PARAMS.alpha
    truth = np.array([report.classes.index(g.labels[i]) for i in te])
    assert np.mean(mpc == ref) >= 0.99
    assert abs(np.mean(mpc == truth) - np.mean(ref == truth)) <= 0.01
    assert np.mean(mpc == truth) >= 0.95
    assert np.max(np.abs(conf - ref_conf)) < 0.01
    assert report.run.data_sent_mb > 0 and report.run.parties[0].returncode == 0


def test_model_shares_reconstruct_to_reference_weights(trained, lfw10_split):
    g, tr, _ = lfw10_split
    layout, report = trained
    d1, c = g.embeddings.shape[1] + 1, len(report.classes)
    from orchestration.client.private import _read_shares

    shares = [_read_shares(layout.model_dir(i) / f"Transactions-P{i}.data", 0, d1 * c) for i in range(2)]
    w = sharing.decode_fixed(sharing.reconstruct(*shares)).reshape(d1, c)
    ref = _reference(g, tr, report.classes)
    assert np.max(np.abs(w - ref)) < 0.05 * np.max(np.abs(ref))
    # each share alone is nothing like the model
    for s in shares:
        assert np.max(np.abs(sharing.decode_fixed(s))) > 1e6


def test_threshold_rejects_faces_below_it(mp, trained, lfw10_split):
    g, _, te = lfw10_split
    layout, _ = trained
    rep = predict_private(mp, layout, g.embeddings[te[:3]], threshold=1000.0)  # above any top logit
    assert all(p.label == UNKNOWN for p in rep.predictions)
    assert all(0 < p.confidence <= 1.0 + 1e-3 for p in rep.predictions)
    # the decision is on z_max, whatever 1/S says: a threshold just above one face's score rejects that face alone
    scores = [p.score for p in rep.predictions]
    k = int(np.argmin(scores))
    rep = predict_private(mp, layout, g.embeddings[te[:3]], threshold=scores[k] + 0.01)
    assert [p.label == UNKNOWN for p in rep.predictions] == [j == k for j in range(3)], scores


def _fixed_point_needles(values: np.ndarray) -> set[bytes]:
    """Byte patterns a plaintext value would leave in a file: int64 fixed-point, float64.

    (4-byte float32 patterns would turn up in kilobytes of random shares by chance.)"""
    out = set()
    for v in np.asarray(values, dtype=np.float64).ravel():
        if abs(v) < 1e-3:
            continue  # tiny values collide with anything
        out.add(int(round(v * 2 ** 16)).to_bytes(8, "little", signed=True))
        out.add(np.float64(v).tobytes())
    return out


def assert_no_plaintext(files: list[Path], names: list[bytes], needles: set[bytes]) -> None:
    """No file holds a name or any of the byte patterns of plaintext values (:func:`_fixed_point_needles`)."""
    for path in files:
        data = path.read_bytes()
        for name in names:
            assert name not in data, f"{path} contains the name {name!r}"
        for needle in needles:
            assert needle not in data, f"{path} contains a plaintext value"


SERVER_JSON_KEYS = {"c", "created", "d1", "frac_bits", "n", "program", "program_version", "run_id", "job", "q",
                    "values", "d", "extra", "file", "kind", "n_classes", "n_values", "party", "ring_bits", "sha256",
                    "gen", "model_gen", "program_args", "status", "finished", "seconds", "data_sent_mb",
                    "global_data_mb", "refreshed_from", "protocol", "rounds", "seq", "exp_bits", "online_rounds",
                    "offline_rounds"}


def _server_files(layout: Layout) -> list[Path]:
    files = []
    for i in range(2):
        files += [p for p in layout.server(i).rglob("*") if p.is_file()]
    return files


def test_server_folders_hold_no_plaintext(mp, trained, lfw10_split):
    g, tr, te = lfw10_split
    layout, report = trained
    from orchestration.client import jobs as client
    from orchestration.client.private import run_local

    # the steps of predict_private, looking at the servers' folders before the client collects
    sent = client.share_predict(layout.client, g.embeddings[te[:4]], 0.0,
                                [layout.server(i) / "inputs" / "{job}" for i in range(2)])
    _, outs = run_local(mp, layout, sent)
    files = _server_files(layout)
    rep = client.collect(layout.client, sent.job, outs)
    assert any(p.name.endswith(".data") for p in files) and any(p.suffix == ".bin" for p in files)
    w = _reference(g, tr, report.classes)
    needles = _fixed_point_needles(g.embeddings[np.concatenate([tr, te[:4]])][:, :40])
    needles |= _fixed_point_needles(w[:20])
    needles |= _fixed_point_needles([p.confidence for p in rep.predictions])
    needles |= _fixed_point_needles([p.score for p in rep.predictions])
    names = [n.encode() for n in report.classes] + [n.replace("_", " ").encode() for n in report.classes]
    assert_no_plaintext(files, names, needles)
    for path in files:
        if path.suffix == ".json":  # manifests: sizes and ids only
            import json

            assert set(json.loads(path.read_bytes())) <= SERVER_JSON_KEYS, f"{path}: unexpected fields"
    # the labels: the share files' class outputs are no small integers
    outs = [p for p in files if p.suffix == ".bin"]
    for p in outs:
        vals = np.frombuffer(p.read_bytes(), "<u8").view(np.int64)
        assert np.mean(np.abs(vals) < 1000) < 0.05, f"{p} looks like plaintext labels"


def test_server_logs_hold_no_secrets(trained):
    layout, report = trained
    logs = [p for i in range(2) for p in (layout.server(i) / "logs").glob("*.log")]
    assert logs
    for log in logs:
        text = log.read_text(errors="replace")
        for name in report.classes:
            assert name not in text
        # MP-SPDZ prints statistics only: no program output lines
        for line in text.splitlines():
            assert not re.match(r"^-?\d+(\.\d+)?(, -?\d+(\.\d+)?)+$", line.strip()), f"{log}: {line}"


#: the only opening and printing a program may do, documented in its header: gallery_enrol opens one validity
#: bit per uploaded row (public: the caller must know which photos to reject) and server 0 prints them on one line
ALLOWED_REVEALS = {
    "gallery_enrol.mpc": ["valid_bits.assign_vector(valid.reveal())",
                          "print_ln('ROWS_OK ' + '%s' * k, *[valid_bits[r] for r in range(k)])"],
}


def test_programs_reveal_and_print_nothing_secret():
    for src in Path(__file__).resolve().parents[1].joinpath("mpc_programs").glob("*.mpc"):
        if src.name == "setup_check.mpc":  # invoke setup's check: reveals a product of two random numbers
            continue
        lines = [line.split("#")[0].strip() for line in src.read_text().splitlines()]
        for allowed in ALLOWED_REVEALS.get(src.name, []):
            assert lines.count(allowed) == 1, f"{src.name}: expected the documented line {allowed!r} once"
            lines.remove(allowed)
        code = "\n".join(lines)
        for forbidden in (".reveal(", "print_ln", "print_str", "reveal_to", "binary_output", "print_ln_to"):
            assert forbidden not in code, f"{src.name} uses {forbidden}"


def test_killed_party_gives_clear_error_and_keeps_model(mp, trained, lfw10_split):
    g, tr, te = lfw10_split
    layout, report = trained
    before = [(layout.model_dir(i) / f"Transactions-P{i}.data").read_bytes() for i in range(2)]

    def kill_party_1(procs):
        os.killpg(procs[1].pid, signal.SIGSTOP)  # training takes well under a second: hold it until the kill

        def later():
            time.sleep(0.5)
            os.killpg(procs[1].pid, signal.SIGKILL)
        threading.Thread(target=later, daemon=True).start()

    start = time.monotonic()
    with pytest.raises(PartyFailed) as err:
        train_private(mp, layout, g.embeddings[tr], [g.labels[i] for i in tr], PARAMS, timeout=120,
                      on_spawn=kill_party_1)
    assert time.monotonic() - start < 120
    assert "server 1" in str(err.value) and err.value.party == 1
    assert err.value.log is not None and err.value.log.exists()
    after = [(layout.model_dir(i) / f"Transactions-P{i}.data").read_bytes() for i in range(2)]
    assert after == before
    # no scratch state left behind
    for i in range(2):
        assert not list(layout.server(i).glob("run-*")) and not list(layout.server(i).glob(".model-*"))
    rep = predict_private(mp, layout, g.embeddings[te[:2]], threshold=0.0)
    assert len(rep.predictions) == 2


def test_hung_party_times_out(mp, trained, lfw10_split):
    g, _, te = lfw10_split
    layout, _ = trained

    def stop_party_0(procs):
        os.killpg(procs[0].pid, signal.SIGSTOP)

    start = time.monotonic()
    with pytest.raises(PartyFailed, match="timed out"):
        predict_private(mp, layout, g.embeddings[te[:2]], threshold=0.0, timeout=5, on_spawn=stop_party_0)
    assert time.monotonic() - start < 30


def test_mismatched_model_is_caught_before_protocol(mp, trained, lfw10_split, tmp_path):
    g, _, te = lfw10_split
    layout, _ = trained
    with pytest.raises(ValueError, match="dimension"):
        predict_private(mp, layout, g.embeddings[te[:2], :64], threshold=0.0)
    import json
    import shutil

    other = Layout(tmp_path / "var")
    shutil.copytree(layout.root, other.root, symlinks=True)
    rec = json.loads(other.client_model.read_text())
    rec["run_id"] = "0000000000000000"
    other.client_model.write_text(json.dumps(rec))
    with pytest.raises(ModelError, match="retrain"):
        predict_private(mp, other, g.embeddings[te[:2]], threshold=0.0)


def test_truncated_model_shares_are_caught(mp, trained, lfw10_split, tmp_path):
    import shutil

    g, _, te = lfw10_split
    layout, _ = trained
    other = Layout(tmp_path / "var")
    shutil.copytree(layout.root, other.root, symlinks=True)
    f = other.model_dir(1) / "Transactions-P1.data"
    f.write_bytes(f.read_bytes()[:-80])
    with pytest.raises(ModelError, match="truncated"):
        predict_private(mp, other, g.embeddings[te[:2]], threshold=0.0)


def test_missing_mpspdz_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MP_SPDZ_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(MPSPDZError, match="semi2k-party.x|official binary release"):
        find_mpspdz()


def test_share_bundle_checks(tmp_path):
    from orchestration.client.private import _check_bundle

    dests = (tmp_path / "s0", tmp_path / "s1")
    sharing.write_share_bundle([(np.ones((2, 3)) * 0.5, sharing.FRAC_BITS)], dests, program="face_train",
                               program_version="v1", kind="train", n=2, d=3, n_classes=2, run_id="r")
    expect = {"program": "face_train", "program_version": "v1", "n": 2, "d": 3}
    _check_bundle(dests[0], 0, expect)
    with pytest.raises(sharing.SharingError, match="not server 1"):
        _check_bundle(dests[0], 1, expect)
    with pytest.raises(sharing.SharingError, match="program_version"):
        _check_bundle(dests[0], 0, dict(expect, program_version="v2"))
    with pytest.raises(sharing.SharingError, match="n is 2, expected 5"):
        _check_bundle(dests[0], 0, dict(expect, n=5))
    f = dests[1] / "Input-Binary-P1-0"
    data = bytearray(f.read_bytes())
    data[3] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(sharing.SharingError, match="checksum"):
        _check_bundle(dests[1], 1, expect)
    f.write_bytes(bytes(data[:-8]))
    with pytest.raises(sharing.SharingError, match="truncated"):
        _check_bundle(dests[1], 1, expect)


def test_two_runs_at_once_do_not_collide(mp, trained, lfw10_split, tmp_path):
    """Each run picks its own free ports: two recognitions in parallel both succeed."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    g, _, te = lfw10_split
    layout, _ = trained
    other = Layout(tmp_path / "var")
    shutil.copytree(layout.root, other.root, symlinks=True)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(predict_private, mp, lay, g.embeddings[te[:3]], 0.0) for lay in (layout, other)]
        results = [f.result(timeout=300) for f in futures]
    a, b = ([p.best for p in r.predictions] for r in results)
    assert a == b and len(a) == 3


def test_the_warm_start_alone_is_trained_from_class_means_of_any_number_of_faces(mp, tmp_path):
    """epochs = 0: the client shares each person's mean (c x d values), never the faces or an n x c one-hot,
    and the servers' model is the float64 nearest-class-mean model of the same means to fixed-point rounding."""
    from synthetic import clusters

    from orchestration.client import jobs
    from orchestration.client.private import _read_shares

    x, labels = clusters(people=12, per=9, d=16, seed=5)
    keep = np.array([not (lab == labels[27] and k % 9) for k, lab in enumerate(labels)])  # one person: 1 face
    x, labels = x[keep], [lab for lab, k in zip(labels, keep) if k]
    params = reference.TrainParams(epochs=0, alpha=16.0, exp_bits=8)
    c, d = len(set(labels)), x.shape[1]
    out = jobs.share_train(tmp_path / "client", x, labels, params, tmp_path / "out")
    for i in range(2):  # what each server is given: alpha and c x d means, whatever n is
        assert (out.bundles[i] / f"Input-Binary-P{i}-0").stat().st_size == 8 * (1 + c * d)
    layout = Layout(tmp_path / "var", "dealer")
    report = train_private(mp, layout, x, labels, params, timeout=600)
    w = sharing.decode_fixed(sharing.reconstruct(*[
        _read_shares(layout.model_dir(i) / f"Transactions-P{i}.data", 0, (d + 1) * c) for i in range(2)]))
    w = w.reshape(d + 1, c)
    idx = np.array([report.classes.index(lab) for lab in labels])
    ref = reference.train(x, idx, c, params)
    np.testing.assert_allclose(ref, reference.warm_start(reference.with_bias(x), idx, c, params.alpha))
    assert np.max(np.abs(w - ref)) < 2 ** -9 * params.alpha, np.max(np.abs(w - ref))
    rep = predict_private(mp, layout, x, threshold=-1e9)
    best, _, zmax = reference.predict_scores(ref, x, params.exp_bits)
    assert [p.label for p in rep.predictions] == best.tolist()
    assert np.max(np.abs(np.array([p.score for p in rep.predictions]) - zmax)) < 2 ** -8 * params.alpha
