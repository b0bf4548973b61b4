"""What the tasks share: invoke.yaml lookups (a flag wins), the run layout, MP-SPDZ, face settings, the service.

Every helper that finds something wrong raises ``Exit(message, code=1)`` naming the file or value at fault.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from invoke import Exit

#: the project root: invoke.yaml's relative paths (paths.var), models/, pyproject.toml
REPO = Path(__file__).resolve().parents[2]

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


def _switch(value, name: str) -> bool:
    """A yes/no setting from invoke.yaml (a boolean) or a flag (text); anything else is an Exit naming it."""
    if value is None or isinstance(value, bool):
        return value is not False
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise Exit(f"{name}: {value!r} is not one of true, false", code=1)


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
    """Face settings from the flags, else invoke.yaml's face section; also sets the landmark model
    (face.landmarks, 5 under face.licence_clean) for this process."""
    from orchestration.client.app import FaceSettings
    from preprocessing.faces import DETECTOR_MODELS, LANDMARK_MODELS, use_landmarks
    from preprocessing.models import LICENCE_CLEAN_MARK, set_licence_clean

    backend = _cfg(c, "face", "backend", backend)
    detector = _cfg(c, "face", "detector", detector)
    if backend not in ("facenet", "dlib"):
        raise Exit(f"--backend {backend!r} is not one of: facenet, dlib", code=1)
    if detector not in DETECTOR_MODELS:
        raise Exit(f"--detector {detector!r} is not one of: {', '.join(DETECTOR_MODELS)}", code=1)
    landmarks = str(_cfg(c, "face", "landmarks", None) or "5")
    if landmarks not in LANDMARK_MODELS:
        raise Exit(f"invoke.yaml face.landmarks {landmarks!r} is not one of: {', '.join(LANDMARK_MODELS)}", code=1)
    clean = bool(_cfg(c, "face", "licence_clean", None)) or (REPO / "models" / LICENCE_CLEAN_MARK).exists()
    if clean and landmarks == "68":
        raise Exit("face.landmarks is 68, but this is a licence-clean setup (face.licence_clean or "
                   f"models/{LICENCE_CLEAN_MARK}): dlib's 68-point model is trained on iBUG 300-W, which excludes "
                   "commercial use; set face.landmarks: 5 in invoke.yaml", code=1)
    set_licence_clean(clean)
    use_landmarks(landmarks)
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


def _two_host_client(c) -> str | None:
    """The service's hosts file when this client is configured for two hosts (service.hosts is a file, not
    "local"), else None: such a client never runs the servers itself."""
    value = _cfg(c, "service", "hosts", None)
    return str(value) if value and str(value) != "local" else None


def _refuse_local_mode(c, task: str, what: str, how: str) -> None:
    """Exit unless local mode is meant: on a client configured for two hosts, ``what`` (of the task named ``task``)
    would run both servers here, making server keys and model shares in <var>/server0 and <var>/server1 that
    no real server holds. ``how`` is what this client does instead (the two-host way of that task)."""
    hosts = _two_host_client(c)
    if hosts is None:
        return
    layout = _layout(c)
    raise Exit(f"{what} would run both servers on this machine (local mode: server keys and model shares in "
               f"{layout.server(0)} and {layout.server(1)}), but this client is configured for two hosts "
               f"(service.hosts: {hosts}); nothing was done. {how} To run local mode here on purpose, unset "
               f"service.hosts in invoke.yaml, or for this one command: INVOKE_SERVICE_HOSTS= invoke {task} ...",
               code=1)


def _refuse_plain_client(c) -> None:
    """Exit before local mode on a client that only asks the service (its service key, no gallery, no dealer
    key) and holds no local servers: local mode would make server keys it must never have."""
    from orchestration.client.jobs import is_data_owner

    layout = _layout(c)
    if is_data_owner(layout.client) is False and not any(layout.server(i).exists() for i in range(2)):
        raise Exit(f"this client ({layout.client}) only asks the service and holds no servers, so it cannot "
                   "recognise in local mode (that would make server keys here); set service.hosts in invoke.yaml "
                   "to the service's hosts file (server 0, server 1), as docs/service.md's checklist for another "
                   "client says", code=1)


def _service(c, use=None, task: str = "predict"):
    """A ServiceClient when the service is configured (service.hosts) and not refused by --one-job (``use``
    False; refused itself on a client configured for two hosts, where it would run both servers here).

    Says on stderr which way recognition goes: through the running service, or one MPC job per batch."""
    if use is False:
        _refuse_local_mode(c, task, "--one-job", "Recognise through the service (leave out --one-job), or on the "
                           "data owner's client with `invoke share-predict` and `invoke party` on each server.")
        _refuse_plain_client(c)
        print("recognition: one MPC job per batch, both servers on this machine (--one-job)", file=sys.stderr)
        return None
    hosts = _service_hosts(c)
    found = False
    if hosts is None:
        hosts = _running_local_service(c)
        found = hosts is not None
    if hosts is None:
        _refuse_plain_client(c)
        if use:
            raise Exit("--service: no service is configured; set service.hosts in invoke.yaml (\"local\" for "
                       "`invoke serve` on this machine, or the service's hosts file)", code=1)
        print("recognition: one MPC job per batch (no service configured: service.hosts in invoke.yaml)",
              file=sys.stderr)
        return None
    from orchestration.client.service import ServiceClient
    from orchestration.shared.wire import ServiceError

    client = ServiceClient(_layout(c).client, hosts, timeout=float(_cfg(c, "service", "timeout", None)),
                           model_record=_cfg(c, "service", "model_record", None))
    local = _two_host_client(c) is None
    try:
        st = client.status()
    except ServiceError as exc:
        if exc.code == "refused":
            raise Exit(f"the service in service.hosts ({hosts.path}) refuses this client: {exc}", code=1)
        other = (" (or recognise without it, both servers on this machine: --one-job)" if local else "")
        raise Exit(f"the service in service.hosts ({hosts.path}) does not answer: {exc}{other}", code=1)
    except Exception as exc:  # certificates missing or wrong
        raise Exit(f"cannot use the service: {exc}", code=1)
    how = (" (found running on this machine: `invoke serve`; set service.hosts: local to say so, or --one-job for "
           "one MPC job per batch)") if found else ""
    print(f"recognition: through the running service at {hosts[0]} and {hosts[1]} ({st[0].get('protocol')}, model "
          f"generation {st[0].get('gen')}, {st[0].get('state')}){how}", file=sys.stderr)
    return client


def _running_local_service(c):
    """The local service's hosts when `invoke serve` runs on this machine now (service.hosts unset), else None:
    a client command then uses it instead of running one MPC job per batch."""
    import socket

    from orchestration.mpspdz.hosts import HostsError, load_hosts
    from orchestration.shared.ports import ServicePorts

    path = _layout(c).root / "service-hosts"
    if not path.is_file():
        return None
    try:
        hosts = load_hosts(path)
        for i in range(2):
            with socket.create_connection(ServicePorts(hosts).client(i), timeout=0.5):
                pass
    except (OSError, HostsError):
        return None
    return hosts


def _said_by(label: str, exc: BaseException) -> str:
    """``label: message``, unless the message names ``label`` first already (no "server 0: server 0: ...")."""
    text = str(exc)
    return text if text.startswith(f"{label}:") or text.startswith(f"{label} ") else f"{label}: {text}"


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
    "detector": "face detector: hog | cnn | cascade (HOG, the CNN only where HOG finds no face)",
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
    """CSV lines ``path,name,confidence,score`` (both empty for no_face_found): confidence 1/S,
    score the top logit z_max the unknown decision is made on."""
    for r in rows:
        out.writerow([str(r.path), r.name, "" if r.confidence is None else f"{r.confidence:.4f}",
                      "" if r.score is None else f"{r.score:.4f}"])


def _progress(items, desc):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=desc, unit="img", file=sys.stderr, disable=len(items) < 4)

