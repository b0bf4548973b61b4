"""Many sources through the running service, on this machine: both servers, the dealer with a key of its
own and every source and query client with its role's certificate (tests/sources_lab.py).

Checked by value: what a source sees (only its persons), what a query client learns (a name or
unknown_person), that no server or dealer file holds a name or an embedding, and that a withdrawn
person leaves nothing that reconstructs from any pair of the servers' files."""
from __future__ import annotations

import secrets

import numpy as np
import pytest

from preprocessing import sharing
from preprocessing.sharing import FRAC_BITS

from orchestration.client.sources import QueryClient, SourceClient, SourceError, encode_name
from orchestration.mpspdz import certs
from orchestration.shared import reference
from orchestration.shared.wire import ServiceError, shares_body
from sources_lab import People, SourcesLab
from test_mpc import assert_no_plaintext

ENROLLED = {"bank": [(0, "Ana Álvarez"), (1, "Bo Bergström"), (2, "Cy Okafor")], "clinic": [(3, "Dee Nwosu"), (4, "Eve Tanaka")],
            "kiosk": [(5, "Fay Lindqvist")]}
STRANGERS = [20, 21, 22]


@pytest.fixture(scope="module")
def lab(mp, tmp_path_factory):
    lab = SourcesLab(mp, tmp_path_factory.mktemp("sources")).start()
    lab.people = People(30)
    lab.sent = {}  # source -> name -> photos sent (float)
    lab.ids = {}
    for source, persons in ENROLLED.items():
        with SourceClient(lab.client(source, "source"), lab.hosts) as sc:
            for j, name in persons:
                x = lab.people.photos(j, 6)
                r = sc.contribute(name, x)
                lab.sent.setdefault(source, {})[name] = x
                lab.ids[name] = r["person"]
    lab.door = lab.client("door", "query")
    yield lab
    lab.stop()


def _ask(lab, js, k=1):
    with QueryClient(lab.door, lab.hosts) as qc:
        return qc.recognise(np.vstack([lab.people.photos(j, k) for j in js]))


def _names(lab) -> dict[int, str]:
    return {j: name for persons in ENROLLED.values() for j, name in persons}


def test_each_source_lists_only_its_own_persons(lab):
    for source, persons in ENROLLED.items():
        with SourceClient(lab.client(source, "source"), lab.hosts) as sc:
            listed = sc.gallery()
        assert sorted(p.name for p in listed) == sorted(name for _, name in persons)
        assert all(p.photos == 6 for p in listed)


def test_a_query_client_learns_a_name_or_unknown_person(lab):
    names = _names(lab)
    got = _ask(lab, list(names) + STRANGERS)
    assert [g[0] for g in got] == list(names.values()) + ["unknown_person"] * len(STRANGERS)
    assert all(score >= lab.settings["thresholds"][0][1] for _, score in got[:len(names)])  # z_max, a logit
    assert all(score > 6.0 for _, score in got[:len(names)])  # near alpha/2 = 8: the top logit, not 1/S <= 1
    assert all(conf == 0.0 for _, conf in got[len(names):])  # a stranger's answer is zeros: nothing to learn


def test_an_operator_sees_counts_only(lab):
    from orchestration.client.service import ServiceClient

    with ServiceClient(lab.layout.client, lab.hosts) as cl:
        st = cl.status()
    assert st[0]["gallery"] == {"sources": 3, "persons": 6, "photos": 36}
    with ServiceClient(lab.door, lab.hosts) as cl:
        assert "gallery" not in cl.status()[0]  # a query client is not told the gallery's size


def _raw_contribution(sc: SourceClient, values: np.ndarray, *, new=True, person=None, d=128, name="X",
                      cid=None) -> list:
    """Frames of a contribution made past the client's checks (``values`` real, or raw ring elements as uint64)."""
    words = encode_name(name, 8)
    body = (values if values.dtype == np.uint64 else sharing.encode_fixed(values, FRAC_BITS)).reshape(-1)
    if new:
        body = np.concatenate([body, words])
    head = {"type": "contribute", "id": cid or secrets.token_hex(16), "person": person or secrets.token_hex(16),
            "new": new, "n": int(len(values)), "d": d}
    return [(head, shares_body(h)) for h in sharing.share(body)]


def _state(lab):
    gens = [sorted(p.name for p in (lab.layout.server(i) / "models").iterdir()) for i in range(2)]
    pending = [sorted(p.name for p in (lab.layout.server(i) / "gallery" / "pending").glob("*"))
               for i in range(2) if (lab.layout.server(i) / "gallery" / "pending").exists()]
    with SourceClient(lab.client("bank", "source"), lab.hosts) as sc:
        listed = sorted((p.person, p.photos) for p in sc.gallery())
    return gens, pending, listed


def test_bad_input_is_refused_with_a_clear_error_and_changes_nothing(lab):
    before = _state(lab)
    bank = lab.client("bank", "source")
    with SourceClient(bank, lab.hosts) as sc:
        good = lab.people.photos(9, 3)
        with pytest.raises(SourceError, match=r"shape \(3, 64\), expected \(photos, 128\)"):
            sc.contribute("Gus", good[:, :64])
        nan = good.copy()
        nan[1, 5] = np.nan
        with pytest.raises(SourceError, match="photo.s. 1 hold NaN"):
            sc.contribute("Gus", nan)
        with pytest.raises(SourceError, match="outside"):
            sc.contribute("Gus", good * 10)
        with pytest.raises(SourceError, match="at most 64 fit"):
            sc.contribute("G" * 65, good)
        # what a hostile source could send past its own client's checks: refused on the servers
        with pytest.raises(ServiceError, match="128-value ones"):
            sc._both(_raw_contribution(sc, np.zeros((2, 64)), d=64), "contribute")
        bad = good.copy()
        bad[2] = 0.9  # every value in range, norm 10
        with pytest.raises(ServiceError, match=r"refused whole: photo\(s\) 2 of it are not unit-length"):
            sc._both(_raw_contribution(sc, bad), "contribute")
        huge = sharing.encode_fixed(good, FRAC_BITS)
        huge[0, 0] = np.uint64(2 ** 40)  # raw ring value: its square wraps; only a full-ring check on shares sees it
        with pytest.raises(ServiceError, match=r"photo\(s\) 0 of it"):
            sc._both(_raw_contribution(sc, huge), "contribute")
        with pytest.raises(ServiceError, match="holds no person"):
            sc.contribute("Gus", good, person=secrets.token_hex(16))
        frames = _raw_contribution(sc, good, name="Replay")
        sc._both(frames, "contribute")
        with pytest.raises(ServiceError, match="already received.*replay"):
            sc._both(frames, "contribute")
        sc.withdraw(frames[0][0]["person"])  # the replayed person's first (accepted) copy goes again
        with pytest.raises(ServiceError, match="holds no person"):  # another source's person
            sc._both([({"type": "withdraw", "id": secrets.token_hex(16), "person": lab.ids["Dee Nwosu"]}, b"")] * 2,
                     "withdraw")
    with SourceClient(lab.door, lab.hosts) as qc:  # a query client may not contribute
        with pytest.raises(ServiceError, match=r"client door \(role query\) may not contribute"):
            qc._both(_raw_contribution(qc, good), "contribute")
    with pytest.raises(certs.CertError, match="a source never deals"):  # a source may not deal ...
        certs.refuse_to_deal_as_source(bank)
    with pytest.raises(certs.CertError):  # ... nor be pinned as the dealer
        certs.import_peer_cert(lab.layout.server(0), 0, _as_party2(bank, lab.layout.root), replace=True)
    after = _state(lab)
    assert after[2] == before[2] and not any(after[1])  # the bank's persons as they were, nothing pending
    assert _ask(lab, [0])[0][0] == "Ana Álvarez"


def test_half_a_contribution_is_refused_on_both_servers_and_changes_nothing(lab):
    """A source that dies between its two sends: the half that arrived is refused after the servers' wait
    (2 x follower_wait = 10 s here) and leaves nothing, whichever server it reached."""
    import time

    before = _state(lab)
    with SourceClient(lab.client("bank", "source"), lab.hosts, timeout=60) as sc:
        for i in (1, 0):
            frames = _raw_contribution(sc, lab.people.photos(12, 3), name="Half")
            sock = sc.svc._sock(i)
            from orchestration.shared.wire import receive, send

            t0 = time.monotonic()
            send(sock, *frames[i])
            head, _ = receive(sock)
            assert head["type"] == "error" and "reached" in head["message"] and "only" in head["message"], head
            assert time.monotonic() - t0 < 30
            sc.close()
    after = _state(lab)
    assert after[2] == before[2] and not any(after[1])


def _as_party2(source_dir, root):
    """A certificate with the source's own key and the dealer's common name P2: what a source would hand in."""
    import subprocess

    key = certs.client_files(source_dir)[0]
    out = root / "fake-P2.pem"
    subprocess.run(["openssl", "req", "-new", "-x509", "-key", str(key), "-out", str(out), "-subj", "/CN=P2",
                    "-days", "2"], check=True, capture_output=True)
    return out


def test_servers_and_dealer_hold_no_name_or_embedding(lab):
    files = [p for group in lab.server_files() for p in group]
    names = [name.encode() for persons in ENROLLED.values() for _, name in persons]
    needles = set()
    for per_source in lab.sent.values():
        for x in per_source.values():
            needles |= _pair_needles(x[:, :32])
    assert_no_plaintext(files, names, needles)


def _pair_needles(x: np.ndarray) -> set[bytes]:
    """Two consecutive values of a photo, as int64 fixed point and as float64: what an embedding stored in the
    clear would leave. (One small value alone is 2 random bytes and 6 zeros, which the boundary between a
    random share and an empty slot's zero produces by chance.)"""
    out = set()
    for row in np.asarray(x, dtype=np.float64):
        fixed = sharing.encode_fixed(row, FRAC_BITS).astype("<u8")
        for j in range(len(row) - 1):
            out.add(fixed[j:j + 2].tobytes())
            out.add(row[j:j + 2].astype("<f8").tobytes())
    return out


def _reconstructs(lab, x: np.ndarray, name: str) -> list[str]:
    """Every pair (server 0's file, server 1's file) whose sum, at any byte alignment, holds a run of the
    person's fixed-point embedding values or their name's first word."""
    targets = [sharing.encode_fixed(row[:4], FRAC_BITS).astype(np.uint64) for row in x]
    word = encode_name(name, 8)[0]
    files0, files1, _ = lab.server_files()
    hits = []
    for f0 in files0:
        b0 = f0.read_bytes()
        for f1 in files1:
            b1 = f1.read_bytes()
            for o0 in range(8):
                for o1 in range(8):
                    n = min((len(b0) - o0) // 8, (len(b1) - o1) // 8)
                    if n < 1:
                        continue
                    with np.errstate(over="ignore"):
                        s = (np.frombuffer(b0, "<u8", n, o0) + np.frombuffer(b1, "<u8", n, o1)).astype(np.uint64)
                    if (s == word).any() or any(_has_run(s, t) for t in targets):
                        hits.append(f"{f0} + {f1}")
    return hits


def _has_run(s: np.ndarray, t: np.ndarray) -> bool:
    idx = np.flatnonzero(s == t[0])
    return any(idx_ + len(t) <= len(s) and np.array_equal(s[idx_:idx_ + len(t)], t) for idx_ in idx)


def test_retraining_on_the_servers_agrees_with_training_on_the_union_in_the_clear(lab):
    with SourceClient(lab.layout.client, lab.hosts) as op:
        r = op.train(epochs=1, batch=8, lr=1.0)
    assert r["persons"] == 6 and r["photos"] == 36
    # the reference: the same rows, in the servers' class order (source/person id) and SGD order
    keys = sorted((f"{s}/{lab.ids[name]}", name) for s, persons in lab.sent.items() for name in persons)
    xs = [sharing.decode_fixed(sharing.encode_fixed(lab.sent[k.split('/')[0]][name], FRAC_BITS)) for k, name in keys]
    x = np.concatenate(xs)
    labels = np.concatenate([[j] * len(v) for j, v in enumerate(xs)])
    params = reference.TrainParams(epochs=1, batch=8, lr=1.0, alpha=16.0, exp_bits=8, seed=int(r["seed"]))
    order = reference.training_order(len(x), params.seed)
    w = reference.train(x[order], labels[order], len(keys), params)
    names = _names(lab)
    queries = np.vstack([lab.people.photos(j, 20) for j in names])
    best, _, zmax = reference.predict_scores(w, queries, 8)
    expect = [keys[b][1] if z >= lab.settings["thresholds"][0][1] else "unknown_person" for b, z in zip(best, zmax)]
    with QueryClient(lab.door, lab.hosts) as qc:
        got = [g[0] for g in qc.recognise(queries)]
    assert np.mean([a == b for a, b in zip(got, expect)]) >= 0.995
    assert got[:20] == ["Ana Álvarez"] * 20


def test_a_withdrawn_person_is_unknown_and_nothing_of_them_reconstructs(lab):
    x, name = lab.sent["bank"]["Bo Bergström"], "Bo Bergström"
    assert _reconstructs(lab, x, name), "the check finds a person who is still enrolled (or it could not fail)"
    with SourceClient(lab.client("bank", "source"), lab.hosts) as sc:
        done = sc.withdraw("Bo Bergström")
        assert len(done) == 1 and {r["statement"].count('"server"') for r in done[0]["receipts"]} == {1}
        assert "Bo Bergström" not in [p.name for p in sc.gallery()]
    got = _ask(lab, [1, 0, 3, 5], k=1)
    assert [g[0] for g in got] == ["unknown_person", "Ana Álvarez", "Dee Nwosu", "Fay Lindqvist"]
    assert _reconstructs(lab, x, name) == []
    for i in range(2):  # one generation left: every older one, which held Bo's column, is destroyed
        assert len([p for p in (lab.layout.server(i) / "models").iterdir() if not p.name.startswith(".")]) == 1


def test_the_same_flow_with_semi2k_and_no_dealer(mp, tmp_path):
    lab = SourcesLab(mp, tmp_path, proto="semi2k").start()
    try:
        people = People(10, seed=3)
        with SourceClient(lab.client("a", "source"), lab.hosts) as sa, \
                SourceClient(lab.client("b", "source"), lab.hosts) as sb:
            sa.contribute("Ann", people.photos(0, 4))
            sb.contribute("Ben", people.photos(1, 4))
        with QueryClient(lab.client("q", "query"), lab.hosts) as qc:
            got = qc.recognise(np.vstack([people.photos(j, 1) for j in (0, 1, 7)]))
        assert [g[0] for g in got] == ["Ann", "Ben", "unknown_person"]
        assert not (lab.layout.root / "dealer").exists()  # nobody dealt
    finally:
        lab.stop()
