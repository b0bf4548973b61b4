"""The invoke tasks end to end, as a user runs them (real MP-SPDZ protocol, dlib backend for speed)."""
from __future__ import annotations

import csv
import json
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.mpc

REPO = Path(__file__).resolve().parents[1]
PEOPLE = ["Colin_Powell", "George_W_Bush", "Tony_Blair", "Vladimir_Putin"]


def invoke(var: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, INVOKE_PATHS_VAR=str(var), TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
    if check and r.returncode != 0:
        raise AssertionError(f"invoke {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def workspace(lfw10, tmp_path_factory):
    """A gallery of 4 people x 7 images (symlinks to lfw10); images 8-10 held out."""
    root = tmp_path_factory.mktemp("cli")
    gallery = root / "gallery"
    held = {}
    for person in PEOPLE:
        imgs = sorted((lfw10 / person).glob("*.jpg"))
        (gallery / person).mkdir(parents=True)
        for img in imgs[:7]:
            (gallery / person / img.name).symlink_to(img)
        held[person] = imgs[7:]
    var = root / "var"
    r = invoke(var, "train", "--dataset", str(gallery), "--backend", "dlib")
    return root, gallery, var, held, r


def test_train_reports_model_and_threshold(workspace):
    _, _, var, _, r = workspace
    assert "embedded 28 faces of 4 people" in r.stdout
    assert "trained model" in r.stdout and "MB sent between the servers" in r.stdout
    assert "unknown-face threshold" in r.stdout and "on the top logit z_max" in r.stdout
    assert json.loads((var / "client" / "model.json").read_text())["threshold_score"] == "zmax"
    assert (var / "server0" / "model" / "Transactions-P0.data").exists()


def test_predict_prints_csv_with_names_and_sentinels(workspace, lfw10, lfw_unknown, tmp_path):
    _, _, var, held, _ = workspace
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(blank)
    unknown = sorted(lfw_unknown.glob("*.jpg"))[5]
    images = [held["Tony_Blair"][0], held["Colin_Powell"][1], blank, unknown]
    args = ["predict", "--backend", "dlib"]
    for img in images:
        args += ["--image", str(img)]
    r = invoke(var, *args)
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == ["path", "name", "confidence", "score"]
    by_path = {row[0]: row for row in rows[1:]}
    assert by_path[str(images[0])][1] == "Tony_Blair"
    assert by_path[str(images[1])][1] == "Colin_Powell"
    assert by_path[str(blank)][1:] == ["no_face_found", "", ""]
    assert by_path[str(unknown)][1] == "unknown_person"
    assert [row[0] for row in rows[1:]] == [str(p) for p in images]  # input order kept
    assert 0.0 < float(by_path[str(images[0])][2]) <= 1.0
    # the score is the top logit z_max the decision is made on: the model's threshold separates named from unknown
    threshold = json.loads((var / "client" / "model.json").read_text())["threshold"]
    assert float(by_path[str(images[0])][3]) >= threshold > float(by_path[str(unknown)][3])


def test_serve_answers_predict_and_stops_on_sigterm(workspace, lfw10, lfw_unknown):
    """Local mode: `invoke serve` runs both servers and the dealer; `invoke predict` goes through it (and says
    so) with the one-job mode's answers, with service.hosts set and also without (it finds the running local
    service); SIGTERM stops it all."""
    import signal
    import socket
    import time

    _, _, var, held, _ = workspace
    with socket.socket() as s:  # a free base port (the service uses base..base+302)
        s.bind(("127.0.0.1", 0))
        base = 20000 + s.getsockname()[1] % 20000
    env = dict(os.environ, INVOKE_PATHS_VAR=str(var), INVOKE_SERVICE_PORT=str(base), TF_CPP_MIN_LOG_LEVEL="3")
    serve = subprocess.Popen([sys.executable, "-m", "invoke", "serve"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = serve.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("running service: model generation"):
                break
        assert any(ln.startswith("running service: model generation") for ln in lines), "".join(lines)
        images = [held["Tony_Blair"][0], held["Vladimir_Putin"][0], sorted(lfw_unknown.glob("*.jpg"))[5]]
        args = ["predict", "--backend", "dlib"] + [a for img in images for a in ("--image", str(img))]
        found = invoke(var, *args)  # service.hosts unset: the running local service is found, and said so
        assert "found running on this machine" in found.stderr, found.stderr
        one_job = invoke(var, *args, "--one-job")
        os.environ["INVOKE_SERVICE_HOSTS"] = "local"
        os.environ["INVOKE_SERVICE_PORT"] = str(base)
        try:
            through = invoke(var, *args)
        finally:
            del os.environ["INVOKE_SERVICE_HOSTS"], os.environ["INVOKE_SERVICE_PORT"]
        assert "recognition: through the running service" in through.stderr, through.stderr
        assert "recognition: one MPC job per batch" in one_job.stderr
        rows = [r[:2] for r in csv.reader(io.StringIO(through.stdout))]
        assert rows == [r[:2] for r in csv.reader(io.StringIO(one_job.stdout))]
        assert rows == [r[:2] for r in csv.reader(io.StringIO(found.stdout))]
        assert [r[1] for r in rows[1:]] == ["Tony_Blair", "Vladimir_Putin", "unknown_person"]
        # the same scores (the top logit z_max) through the service as in one job, up to fixed-point rounding
        scores = [[float(r[3]) for r in list(csv.reader(io.StringIO(out.stdout)))[1:]] for out in (through, one_job)]
        assert np.allclose(scores[0], scores[1], atol=2e-3), scores
    finally:
        serve.send_signal(signal.SIGTERM)
        out, _ = serve.communicate(timeout=60)
    assert serve.returncode == 0, "".join(lines) + out
    assert "stopped (servers exited with 0 and 0)" in out
    left = subprocess.run(["pgrep", "-f", str(var)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left behind: {left}"


def test_predict_dir_and_bad_inputs(workspace, tmp_path):
    _, _, var, held, _ = workspace
    d = tmp_path / "queries"
    d.mkdir()
    for person in ("George_W_Bush", "Vladimir_Putin"):
        (d / held[person][0].name).symlink_to(held[person][0])
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    r = invoke(var, "predict", "--backend", "dlib", "--dir", str(d), check=False)
    assert r.returncode == 1
    assert "broken.jpg" in r.stderr and "could not be read" in r.stderr
    names = {Path(row[0]).name: row[1] for row in csv.reader(io.StringIO(r.stdout)) if row[0] != "path"}
    assert names[held["George_W_Bush"][0].name] == "George_W_Bush"
    assert names[held["Vladimir_Putin"][0].name] == "Vladimir_Putin"
    assert names["broken.jpg"] == "no_face_found"

    missing = invoke(var, "predict", "--backend", "dlib", "--image", str(tmp_path / "nope.jpg"), check=False)
    assert missing.returncode == 1 and "nope.jpg" in missing.stderr
    wrong = invoke(var, "predict", "--backend", "facenet", "--image", str(held["Tony_Blair"][0]), check=False)
    assert wrong.returncode == 1 and "trained on dlib" in wrong.stderr
    bad = invoke(var, "predict", "--backend", "nope", "--image", str(held["Tony_Blair"][0]), check=False)
    assert bad.returncode == 1 and "facenet, dlib" in bad.stderr


def test_retrain_reuses_cache_and_says_what_changed(workspace, lfw10):
    _, gallery, var, held, _ = workspace
    extra = held["Tony_Blair"][-1]
    (gallery / "Tony_Blair" / extra.name).symlink_to(extra)
    try:
        r = invoke(var, "train", "--dataset", str(gallery), "--backend", "dlib")
    finally:
        (gallery / "Tony_Blair" / extra.name).unlink()
    assert "(1 new, 28 from cache" in r.stdout
    assert "changes since last training" in r.stdout and "added" in r.stdout


def test_evaluate_writes_report_with_pictures(workspace, lfw_unknown, tmp_path):
    _, gallery, var, _, _ = workspace
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    for img in sorted(lfw_unknown.glob("*.jpg"))[:12]:
        (unknown / img.name).symlink_to(img)
    out = tmp_path / "report"
    r = invoke(var, "evaluate", "--dataset", str(gallery), "--unknown", str(unknown), "--output", str(out),
               "--backend", "dlib")
    assert "closed-set accuracy" in r.stdout
    text = (out / "report.md").read_text()
    for key in ("closed-set accuracy under MPC", "plaintext reference", "unknown faces rejected", "training (MPC"):
        assert key in text
    for key in ("TPIR", "FPIR <= 10%", "threshold used", "five worst persons"):
        assert key in text
    pngs = ["confusion.png", "open_set.png", "det.png", "scores.png"]
    if "Every person's test faces came back with the right name" not in text:
        pngs.append("worst_persons.png")
    for png in pngs:
        assert f"]({png})" in text
        with Image.open(out / png) as im:
            assert im.size[0] >= 300 and im.size[1] >= 300
            arr = np.asarray(im.convert("L"))
            assert arr.std() > 5  # a drawn picture, not a blank canvas
    import json

    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["closed_set_accuracy"] >= 0.8 and ev["agreement"] >= 0.99
    used = ev["open_set"]["operating_points"][-1]
    assert used["label"] == "threshold used" and used["threshold"] == ev["threshold"]
    assert ev["open_set"]["targets_skipped"] == [0.001, 0.01]  # 12 strangers: only 10% is measurable


def test_build_mpc_compiles_for_the_trained_sizes(workspace):
    _, _, var, _, _ = workspace
    r = invoke(var, "build-mpc", "--batches", "1,2")
    assert "compiled face_train-" in r.stdout and "compiled face_predict-1-129-4-8" in r.stdout


def test_two_host_tasks_share_party_collect(workspace, tmp_path):
    """The client's share-predict, `invoke deal` and collect around two `invoke party` runs (all on localhost)."""
    import threading

    from orchestration.mpspdz.launcher import free_ports

    _, _, var, held, _ = workspace
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((120, 120, 3), 90, np.uint8)).save(blank)
    out = tmp_path / "out"
    r = invoke(var, "share-predict", "--out", str(out), "--backend", "dlib", "--image",
               str(held["Vladimir_Putin"][0]), "--image", str(blank), "--image", str(held["George_W_Bush"][1]))
    job = r.stdout.split()[1].rstrip(":")
    assert job.startswith("predict-") and (out / "server0" / "manifest.json").exists()
    port = free_ports("127.0.0.1", 3)  # three consecutive free ports, not one free port and two guesses
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1:{port}\n127.0.0.1:{port + 1}\n127.0.0.1:{port + 2}\n")
    assert "invoke deal --job" in r.stdout  # share-predict tells the client to deal (the default dealer mode)
    assert "protocol: dealer (the client deals" in r.stderr  # and says which protocol it uses
    results: dict[int, subprocess.CompletedProcess[str]] = {}

    def party(i: int) -> None:
        # a run's own timeout well inside the test's: a party that fails leaves the others waiting for it,
        # and then the launcher's diagnosis must reach this test instead of the subprocess being killed
        if i == 2:
            results[i] = invoke(var, "deal", "--job", job, "--hosts", str(hosts), "--timeout", "300", check=False)
            return
        results[i] = invoke(var, "party", "--id", str(i), "--hosts", str(hosts), "--job", str(out / f"server{i}"),
                            "--timeout", "300", check=False)

    threads = [threading.Thread(target=party, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    said = "\n".join(f"--- {'dealer' if i == 2 else f'server {i}'} exited {results[i].returncode}:\n{results[i].stderr}"
                     for i in range(3))
    for i in range(2):
        assert results[i].returncode == 0, said
        assert f"send {var / f'server{i}' / 'outputs' / job}" in results[i].stdout
    assert results[2].returncode == 0 and f"the dealer (the data owner's client): dealt job {job}" in results[2].stdout, results[2].stderr
    r = invoke(var, "collect", "--job", job, "--result", str(var / "server0" / "outputs" / job), "--result",
               str(var / "server1" / "outputs" / job))
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == ["path", "name", "confidence", "score"]
    assert [row[:2] for row in rows[1:]] == [[str(held["Vladimir_Putin"][0]), "Vladimir_Putin"],
                                            [str(blank), "no_face_found"],
                                            [str(held["George_W_Bush"][1]), "George_W_Bush"]]
    # collected once: a second collect says the job is no longer waiting
    again = invoke(var, "collect", "--job", job, "--result", "a", "--result", "b", check=False)
    assert again.returncode == 1 and f"no job {job!r} waiting" in again.stderr
    bad = invoke(var, "party", "--id", "2", "--hosts", str(hosts), "--job", str(out / "server0"), check=False)
    assert bad.returncode == 1 and "--id must be 0 or 1" in bad.stderr


# ---- invoke setup -------------------------------------------------------------------------------

def test_setup_refuses_a_bad_archive(tmp_path):
    bad = tmp_path / "mp-spdz-bad.tar.xz"
    bad.write_bytes(b"not an archive at all")
    home = tmp_path / "opt" / "mp-spdz"
    r = invoke(tmp_path / "var", "setup", "--home", str(home), "--archive", str(bad), check=False)
    assert r.returncode == 1, r.stdout + r.stderr  # no checksum beside it: refused before it is opened
    assert f"{bad}" in r.stderr and "--unverified" in r.stderr and "Nothing was installed" in r.stderr
    assert not home.exists()
    r = invoke(tmp_path / "var", "setup", "--home", str(home), "--archive", str(bad), "--unverified", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"setup failed: {bad}: cannot unpack it, it is truncated, corrupt or not a .tar.xz" in r.stderr
    assert "nothing was installed" in r.stderr
    assert not home.exists() and not list(home.parent.iterdir())


def test_setup_takes_the_archive_from_invoke_yaml_and_the_flag_wins(tmp_path):
    (tmp_path / "from-config.tar.xz").write_bytes(b"garbage")
    (tmp_path / "from-flag.tar.xz").write_bytes(b"garbage")
    env = dict(os.environ, INVOKE_MPSPDZ_ARCHIVE=str(tmp_path / "from-config.tar.xz"))
    home = str(tmp_path / "opt" / "mp-spdz")
    run = [sys.executable, "-m", "invoke", "setup", "--home", home, "--unverified"]
    r = subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and f"setup failed: {tmp_path / 'from-config.tar.xz'}: cannot unpack it" in r.stderr
    r = subprocess.run([*run, "--archive", str(tmp_path / "from-flag.tar.xz")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and f"setup failed: {tmp_path / 'from-flag.tar.xz'}: cannot unpack it" in r.stderr
    r = subprocess.run([*run, "--from-source", str(tmp_path / "nowhere"), "--jobs", "x"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "--jobs 'x': expected a whole number" in r.stderr
    r = subprocess.run([*run, "--from-source", str(tmp_path / "nowhere")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and f"--from-source {tmp_path / 'nowhere'}: no such folder" in r.stderr


def test_setup_online_without_github_says_what_to_do(tmp_path):
    """Online setup asks GitHub's releases API for the release's digest; where GitHub cannot be reached (as
    here) it says so and names the offline way, and installs nothing."""
    home = tmp_path / "opt" / "mp-spdz"
    r = invoke(tmp_path / "var", "setup", "--home", str(home), check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot ask GitHub" in r.stderr and "--archive FILE" in r.stderr, r.stderr
    assert not home.exists()


def test_setup_installs_checks_and_then_only_checks(tmp_path, mpspdz_archive):
    archive = mpspdz_archive  # ../shared's, or this machine's build where that one cannot run (conftest)
    home = tmp_path / "opt" / "mp-spdz"
    args = ["setup", "--home", str(home), "--archive", str(archive), "--no-models"]
    r = invoke(tmp_path / "var", *args)
    assert f"MP-SPDZ installed at {home} from {archive}" in r.stdout
    assert "check passed: semi2k-party.x, two parties over TLS" in r.stdout
    assert "check passed: dealer-ring-party.x, two parties and a dealer (-N 3) over TLS" in r.stdout
    again = invoke(tmp_path / "var", *args)
    assert f"MP-SPDZ at {home} is complete: nothing to install" in again.stdout
    assert "check passed: dealer-ring-party.x" in again.stdout
    assert "everything was in place already; only the check ran" in again.stdout


def test_certs_pins_refuse_bad_names_and_silent_replacement(tmp_path):
    """`invoke certs`: a CN that is no client name is refused (exit 1, nothing written), the same certificate again
    is a no-op, a different one needs --replace-pin, and --replace-pin alone is an error that names --peer-cert."""
    var = tmp_path / "var"
    invoke(var, "certs", "--id", "0")
    invoke(var, "certs", "--id", "1")
    p0, p1 = var / "server0" / "certs" / "P0.pem", var / "server1" / "certs" / "P1.pem"
    invoke(var, "certs", "--id", "1", "--peer-cert", str(p0))
    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "2", "-subj", "/CN=client-..\\/certs\\/P0", "-keyout", str(evil_dir / "k"),
                    "-out", str(evil_dir / "c.pem")], check=True, capture_output=True)
    pin = var / "server1" / "certs" / "P0.pem"
    kept = pin.read_bytes()
    r = invoke(var, "certs", "--id", "1", "--allow-client", str(evil_dir / "c.pem"), check=False)
    assert r.returncode == 1 and "client-../certs/P0" in r.stderr and "letters, digits" in r.stderr, r.stderr
    assert pin.read_bytes() == kept
    assert not (var / "server1" / "clients").exists() or not list((var / "server1" / "clients").iterdir())
    r = invoke(var, "certs", "--id", "1", "--peer-cert", str(p0))
    assert "nothing changed" in r.stdout, r.stdout
    invoke(var, "certs", "--id", "0", "--force")  # server 0 re-keys
    r = invoke(var, "certs", "--id", "1", "--peer-cert", str(p0), check=False)
    assert r.returncode == 1 and "--replace-pin" in r.stderr and r.stderr.count("sha256") == 2, r.stderr
    assert pin.read_bytes() == kept
    r = invoke(var, "certs", "--id", "1", "--replace-pin", check=False)
    assert r.returncode == 1 and "--peer-cert" in r.stderr, r.stderr
    invoke(var, "certs", "--id", "1", "--peer-cert", str(p0), "--replace-pin")
    assert pin.read_bytes() == p0.read_bytes() != kept
    assert "--replace-pin" in invoke(var, "--help", "certs").stdout
    assert p1.is_file()
