"""The data owner's tasks on one machine (local mode: both servers, and the dealer, run here too).

train, predict, enroll, demo, evaluate, recognize, refresh-shares.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from invoke import Exit, task

from orchestration.cli.common import (TRAIN_HELP, _cfg, _embedded_gallery, _face, _gallery, _layout, _logging, _mp,
                                      _progress, _query_paths, _refuse_local_mode, _say_protocol, _service, _tls,
                                      _train_params, _write_rows)


@task(help={
    **TRAIN_HELP,
    "timeout": "seconds the protocol may run before both servers are stopped",
    "mpspdz_home": "MP-SPDZ folder (else MP_SPDZ_HOME, invoke.yaml, /opt/mp-spdz)",
    "verbose": "debug logging",
    "on_servers": "many sources: retrain from the servers' gallery of every source (warm start + SGD on shares), "
                  "asked by the operator's client; nothing is embedded or sent from here",
    "hosts": "with --on-servers: the service's hosts file (default service.hosts; unset: the local service)",
})
def train(c, dataset=None, backend=None, detector=None, epochs=None, batch=None, lr=None, alpha=None, timeout=None,
          mpspdz_home=None, verbose=False, on_servers=False, hosts=None):
    """Embed a gallery on the client, secret-share it and train the classifier on the two servers.

    With --on-servers (many sources): the servers retrain on the gallery they hold as shares."""
    _logging(verbose)
    if on_servers:
        from orchestration.cli.sources import train_on_servers

        if dataset:
            raise Exit("--on-servers trains on the servers' gallery: --dataset does not apply (sources add persons "
                       "with invoke contribute --as NAME --dataset DIR)", code=1)
        train_on_servers(c, epochs, batch, lr, hosts, timeout)
        return
    from orchestration.client import app
    from orchestration.mpspdz.toolchain import MPSPDZError

    _refuse_local_mode(c, "train", "invoke train", "Train on the two hosts with `invoke share-train --out DIR`, "
                       "`invoke party` on each server, then `invoke collect`.")
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
    print(f"unknown-face threshold {t.threshold:.4f} on the top logit z_max (from enrollment data: {t.genuine_accept:.1%} of held-out "
          f"enrolled faces accepted, {t.impostor_reject:.1%} of left-out people rejected)")


#: the flags of the tasks that recognise privately (predict, recognize)
RECOGNISE_HELP = {
    "backend": "embedder: facenet | dlib (must match training)",
    "detector": "face detector: hog | cnn | cascade (HOG, the CNN only where HOG finds no face)",
    "timeout": "seconds one protocol run may take",
    "mpspdz_home": "MP-SPDZ folder",
    "verbose": "debug logging",
    "service": "recognise through the running service (the default when service.hosts is set in invoke.yaml)",
    "one_job": "one MPC job per batch with both servers on this machine (local mode), even when service.hosts is "
               "local; refused on a client configured for two hosts (service.hosts a file)",
}


@task(iterable=["image"], help={
    "image": "an image to recognise (repeat for several)",
    "dir": "a folder of images to recognise (recursive)",
    "threshold": "top logit z_max below which a face is unknown_person (default: the one chosen at training)",
    "batch": "faces per MPC run",
    **RECOGNISE_HELP,
    "as_": "many sources: recognise as query client NAME (role query) through the many-source service; it learns a "
           "name or unknown_person, nothing else",
})
def predict(c, image=None, dir=None, threshold=None, batch=64, backend=None, detector=None, timeout=None,
            mpspdz_home=None, verbose=False, service=False, one_job=False, as_=None):
    """Recognise faces privately; prints CSV `path,name,confidence,score` (one line per face; confidence 1/S,
    score the top logit z_max the unknown decision is made on; with --as: `path,name,score`)."""
    _logging(verbose)
    if as_:
        _predict_as(c, as_, image, dir, backend, detector, timeout)
        return
    from orchestration.client import app
    from orchestration.mpspdz.toolchain import MPSPDZError
    from orchestration.shared.wire import ServiceError

    mp = _mp(c, mpspdz_home)
    layout = _layout(c)
    _say_protocol(layout)
    face = _face(c, backend, detector)
    paths = _query_paths(image, dir)
    svc = _service(c, False if one_job else (True if service else None), task="predict")
    unreadable = []

    def said(queries):  # an unreadable image is said at once; its row comes in input order
        for q in queries:
            if q.error:
                print(f"error: {q.error}", file=sys.stderr)
                unreadable.append(q.path)
            yield q

    try:
        app.check_backend(layout, face.backend)
        thr = float(threshold) if threshold is not None else None  # None: the record's, of the answering generation
        out = csv.writer(sys.stdout)
        out.writerow(["path", "name", "confidence", "score"])
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



@task(help={
    "name": "the person's name (a folder name: no path separators, not empty, no leading dot)",
    "source": "camera | camera:N | VIDEO_FILE | IMAGE_DIR",
    "count": "faces to keep",
    "every": "use one frame in K (video/camera)",
    "gallery": "gallery folder (default: paths.gallery, else <var>/gallery)",
    "backend": "facenet | dlib (the saved 250 px aligned crop serves both)",
    "detector": "face detector: hog | cnn | cascade (HOG, the CNN only where HOG finds no face)",
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



@task(help={
    "dataset": "folder <dataset>/<person>/<image>; default: a sample of LFW via scikit-learn (downloads once)",
    "people": "at most this many people (one more is kept aside as the unknown face)",
    "held_out": "photos per person kept out of enrollment and recognised afterwards",
    "backend": "embedder: facenet | dlib",
    "detector": "face detector: hog | cnn | cascade (HOG, the CNN only where HOG finds no face)",
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
    print(f"\n{'image':<{width}}  {'truth':<24} {'secure result':<24} {'conf':>6} {'z_max':>7}  {'plaintext ref':<24} ok")
    n_ok = 0
    for r in rows:
        ok = r.name == r.truth
        n_ok += ok
        print(f"{r.path.name:<{width}}  {r.truth:<24} {r.name:<24} {r.confidence:6.3f} {r.score:7.3f}  {r.reference_name:<24} "
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
    "detector": "face detector: hog | cnn | cascade (HOG, the CNN only where HOG finds no face)",
    "epochs": "SGD epochs after the warm start",
    "mpspdz_home": "MP-SPDZ folder",
    "service": "recognise through a service started for the evaluation's own model (the default when "
               "service.hosts is set); it listens on service.port + 50 and stops at the end",
    "one_job": "one MPC job per batch with both servers on this machine (local mode), even when service.hosts is "
               "local; refused on a client configured for two hosts (service.hosts a file)",
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
        print("recognition: one MPC job per batch" + (" (--one-job)" if one_job else " (no service configured)")
              + f"; both servers run on this machine in {layout.root / 'evaluate'} with keys of their own (the "
              "configured servers, their keys and this client's model are not touched)", file=sys.stderr)
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
    "threshold": "top logit z_max below which a face is unknown_person (default: the one chosen at training)",
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

    Prints CSV `frame,name,confidence,score,top,right,bottom,left` (one line per face, as frames are
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
    svc = _service(c, False if one_job else (True if service else None), task="recognize")
    rows = csv.writer(sys.stdout)
    rows.writerow(["frame", "name", "confidence", "score", "top", "right", "bottom", "left"])

    def on_frame(result) -> None:
        for f in result.faces:
            rows.writerow([result.index, f.name, f"{f.confidence:.4f}", f"{f.score:.4f}", *f.location])
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

    _refuse_local_mode(c, "refresh-shares", "invoke refresh-shares", "Refresh on the two hosts with `invoke "
                       "share-refresh --out DIR`, `invoke party` on each server, `invoke collect`, then `invoke "
                       "share-confirm --out DIR` and `invoke confirm` on each server.")
    mp = _mp(c, mpspdz_home)
    try:
        layout = _layout(c)
        _say_protocol(layout)
        gen, run = refresh_private(mp, layout, host=_cfg(c, "mpspdz", "host", None),
                                   timeout=float(_cfg(c, "mpspdz", "timeout", timeout)), encrypted=_tls(c))
    except MPSPDZError as exc:
        raise Exit(f"share refresh failed: {exc}", code=1)
    print(f"model shares renewed: generation {gen} ({run.wall_seconds:.1f} s, {run.data_sent_mb:.1f} MB)")


def _predict_as(c, name, image, dir, backend, detector, timeout) -> None:
    """`invoke predict --as NAME`: a query client of the many-source service."""
    from orchestration.client import app
    from orchestration.cli.sources import predict_as
    from orchestration.client.sources import SourceError
    from orchestration.shared.wire import ServiceError

    face = _face(c, backend, detector)
    paths = _query_paths(image, dir)
    out = csv.writer(sys.stdout)
    out.writerow(["path", "name", "score"])  # names mode answers the top logit z_max only (no 1/S)
    try:
        for row in predict_as(c, name, app.face_queries(_progress(paths, "faces"), face), timeout=timeout):
            out.writerow(row)
            sys.stdout.flush()
    except (ServiceError, SourceError) as exc:
        raise Exit(f"private recognition failed: {exc}", code=1)
