"""Two hosts: certificates, one server per host, the client's bundles, dealing and the running service.

certs, party, deal, serve (server or client side, as each task's docstring says); share-train,
share-predict, share-refresh, collect, share-confirm (the client); confirm (a server).
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from invoke import Exit, task

from orchestration.cli.common import (TRAIN_HELP, _cfg, _embedded_gallery, _face, _gallery, _layout, _logging, _mp,
                                      _progress, _query_paths, _said_by, _say_protocol, _service_hosts, _switch, _tls,
                                      _train_params, _write_rows)

#: how messages name party 2 (as orchestration.mpspdz.certs.party_label does)
DEALER_LABEL = "the dealer (the data owner's client)"


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


def _say_next(sent) -> None:
    """After share-train/-predict/-refresh: where each bundle goes, what each server runs, then collect."""
    for i, b in enumerate(sent.bundles):
        print(f"send {b} to server {i}; there: invoke party --id {i} --hosts HOSTS --job <that folder>")
    _say_dealer(sent)
    print(f"then: invoke collect --job {sent.job} --result <server 0's outputs/{sent.job}> "
          f"--result <server 1's outputs/{sent.job}>")


def _party_id(value, allow_client: bool = False) -> int:
    allowed = ("0", "1", "2") if allow_client else ("0", "1")
    if str(value) not in allowed:
        what = "0 or 1 (which server this is), or 2 (the client)" if allow_client else "0 or 1 (which server this is)"
        raise Exit(f"--id must be {what}, got {value!r}", code=1)
    return int(value)


@task(iterable=["server_cert"], help={
    "id": "make/import for this party only: server 0 or 1, or 2 for the client (the dealer in the dealer mode); "
          "without it, both local servers and the client get keys and swap certificates",
    "peer_cert": "another party's certificate file (P0.pem, P1.pem, or the dealer's P2.pem) to install on --id; "
                 "the same certificate again changes nothing, a different one where one is pinned needs "
                 "--replace-pin (a client that does not deal uses --server-cert instead)",
    "server_dir": "the server's folder (default <var>/server<id>)",
    "days": "validity of a new certificate in days",
    "force": "replace this party's OWN key and certificate (never a pinned certificate of another party or "
             "client: that is --replace-pin)",
    "replace_pin": "with --peer-cert, --server-cert or --allow-client: replace a pinned certificate that differs "
                   "from the given one (after a re-key); without it such a change is refused with both fingerprints",
    "client": "the service: make this client's key and certificate, common name client-NAME (in <var>/client/certs; "
              "give client.pem to both servers); prints the certificate's path as the last line",
    "role": "with --client: the client's role, written into its certificate (OU=role-ROLE): owner (the default: the "
            "single data owner; a certificate without a role is one), source (a data owner among several: "
            "contributes, lists and withdraws its own persons), query (asks who a face is, learns only a name) or "
            "dealer (the third host that deals; only polls the servers' status). A source or query client never "
            "deals",
    "allow_client": "the service: pin a client's certificate file on server --id as <server>/clients/NAME.pem "
                    "(it may then ask what its role allows; prints its name and role); remove that file to refuse "
                    "it again",
    "server_cert": "the service, on a client that only asks it (a door camera): install a server's certificate "
                   "(P0.pem or P1.pem; give it twice, once per server) into <var>/client/certs; makes no party "
                   "key (the dealer's P2 is --id 2); with --client NAME also this client's key if it has none",
})
def certs(c, id=None, peer_cert=None, server_dir=None, days=365, force=False, client=None, allow_client=None,
          replace_pin=False, server_cert=None, role=None):
    """Make TLS keys and certificates for the parties' encrypted channels, or install another party's certificate.

    Two hosts: on each server `invoke certs --id I` (keeps certs/P<I>.key, prints where P<I>.pem is), send
    P<I>.pem to the other server, which runs `invoke certs --id J --peer-cert P<I>.pem`. Dealer mode: the
    client runs `invoke certs --id 2`, installs both servers' certificates with --peer-cert, and each
    server installs the client's P2.pem the same way. A pin is never replaced silently: after a party
    re-keys (--force), the others install its new certificate with --peer-cert FILE --replace-pin.
    Service: a client makes its key with `invoke certs --client NAME [--role owner|source|query|dealer]`
    (the last line printed is its certificate's path); one that only asks the service (a door camera,
    --role query) installs the servers' certificates with `invoke certs --server-cert P0.pem --server-cert
    P1.pem`, which makes no party key. Each server pins it with `invoke certs --id I --allow-client FILE`.
    """
    _logging()
    from orchestration.mpspdz import certs as certs_mod

    party = None
    if id is not None and not client:
        party = _party_id(id, allow_client=not allow_client)
    if client and role in ("source", "dealer") and not server_dir and not allow_client:
        # many sources: each named client has a folder of its own (`--as NAME` finds it there); the dealer's
        # host keeps its MPC key and its client key together
        from orchestration.mpspdz.certs import check_client_name, CertError

        try:
            server_dir = str(_layout(c).root / ("dealer" if role == "dealer" else f"clients/{check_client_name(client)}"))
        except CertError as exc:
            raise Exit(str(exc), code=1)
    try:
        lines = certs_mod.certs_command(lambda i: _server_dir(c, i), party=party,
                                        peer_cert=Path(peer_cert) if peer_cert else None,
                                        folder=Path(server_dir) if server_dir else None, days=int(days),
                                        force=force, replace_pin=replace_pin, client=client, role=role,
                                        allow=Path(allow_client) if allow_client else None,
                                        server_certs=[Path(p) for p in server_cert or ()])
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
        raise Exit(_said_by(f"server {party_no}", exc), code=1)
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
    "sources": "the dealer of a many-source service, on a host of its own: deals for the service and every "
               "gallery job from --dealer-dir (its P2 key and a dealer-role client certificate)",
    "dealer_dir": "with --sources: the dealer's folder (default <var>/dealer)",
})
def deal(c, job=None, hosts=None, timeout=None, mpspdz_home=None, verbose=False, serve=False, sources=False,
         dealer_dir=None):
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
    if sources:
        import threading

        from orchestration.dealer.daemon import run_dealer
        from orchestration.mpspdz.toolchain import protocol

        service_hosts = _service_hosts(c, hosts)
        if service_hosts is None:
            raise Exit("--sources needs the service's hosts file: --hosts FILE (or service.hosts)", code=1)
        folder = Path(dealer_dir) if dealer_dir else layout.root / "dealer"
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: done.set())
        signal.signal(signal.SIGINT, lambda *_: done.set())
        print(f"the dealer: dealing for the many-source service at {service_hosts[0]} and {service_hosts[1]} "
              f"from {folder}", file=sys.stderr)
        try:
            run_dealer(mp, folder, layout.build, service_hosts, protocol(layout.protocol), done)
        except (remote.ERRORS + (ValueError,)) as exc:
            raise Exit(f"the dealer: {exc}", code=1)
        print("the dealer: stopped", file=sys.stderr)
        return
    try:
        from orchestration.mpspdz import certs as certs_mod

        certs_mod.refuse_to_deal_as_source(layout.client)
    except certs_mod.CertError as exc:
        raise Exit(str(exc), code=1)
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
            raise Exit(_said_by(DEALER_LABEL, exc), code=1)
        print(f"{DEALER_LABEL}: stopped dealing for the service", file=sys.stderr)
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
        raise Exit(_said_by(DEALER_LABEL, exc), code=1)
    except KeyboardInterrupt as exc:
        raise Exit(f"{DEALER_LABEL}: stopped ({exc or 'interrupted'})", code=1)
    p = run.parties[0]
    print(f"{DEALER_LABEL}: dealt job {job} in {run.wall_seconds:.1f} s ({p.data_sent_mb or 0:.1f} MB sent); "
          "collect both servers' results with invoke collect")


@task(help={
    "id": "two hosts: which server this is, 0 or 1; without it both servers (and, dealer mode, the client's "
          "dealer) run on this machine (local mode)",
    "hosts": "two hosts: the service's hosts file (server 0, server 1[, the client's dealer]); default service.hosts",
    "server_dir": "this server's folder: certs, model shares, allowed clients (default <var>/server<id>)",
    "batch": "queries per MPC batch (default service.batch)",
    "lanes": "batches of --batch queries in flight at once, 1..8, the same on both servers (default service.lanes)",
    "quick": "true | false: one more lane, of one query, for a face that comes alone; the same on both servers "
             "(default service.quick)",
    "max_queued": "queries a server holds waiting before it answers busy (default service.max_queued)",
    "max_per_client": "queries one client certificate may have waiting (default service.max_per_client)",
    "max_client_connections": "connections one client certificate may hold to a server (default "
                              "service.max_client_connections)",
    "mpspdz_home": "MP-SPDZ folder",
    "verbose": "debug logging",
    "sources": "a gallery of many sources (contribute, gallery, withdraw, train --on-servers, predict --as); local "
               "mode runs the dealer as a third process with a key of its own (<var>/sources/dealer)",
    "backend": "with --sources: the gallery's embedder, facenet | dlib (default face.backend)",
})
def serve(c, id=None, hosts=None, server_dir=None, batch=None, max_queued=None, max_per_client=None,
          max_client_connections=None, mpspdz_home=None, verbose=False, sources=False, backend=None, lanes=None,
          quick=None):
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
               ("max_client_connections", _cfg(c, "service", "max_client_connections", max_client_connections)),
               ("lanes", _cfg(c, "service", "lanes", lanes)))
              if v is not None]
    limits.append("--quick" if _switch(_cfg(c, "service", "quick", quick), "--quick (service.quick)") else "--no-quick")
    settings = None
    if sources:
        import json

        from orchestration.cli.sources import sources_settings

        settings = sources_settings(c, _face(c, backend).backend)
    if id is not None:
        from orchestration.server import gateway as service_server

        party = _party_id(id)
        hosts_value = _cfg(c, "service", "hosts", hosts)
        if not hosts_value or str(hosts_value) == "local":
            raise Exit("--id needs the service's hosts file: --hosts FILE (or service.hosts in invoke.yaml)", code=1)
        code = service_server.main(["--server-dir", str(_server_dir(c, party, server_dir)), "--id", str(party),
                                    "--hosts", str(hosts_value), "--protocol", proto.name, "--batch", str(n_batch),
                                    "--max-queued", str(n_queued), "--mpspdz-home", str(mp.home), *limits]
                                   + (["--verbose"] if verbose else [])
                                   + (["--sources", json.dumps(settings)] if settings is not None else []))
        if code:
            raise Exit(f"server {party}: the service stopped with an error (see above)", code=code)
        return
    from orchestration.client.local_service import LocalService

    done = threading.Event()

    def stop(signum, frame):
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if settings is not None:
        from orchestration.client.local_sources import sources_layout

        layout = sources_layout(layout)
    svc = LocalService(mp, layout, proto, host=_cfg(c, "mpspdz", "host", None),
                       port=int(_cfg(c, "service", "port", None)), batch=n_batch, max_queued=n_queued,
                       extra_args=limits, sources=settings)
    try:
        svc.start()
        st = svc.wait_ready(timeout=300, serving=settings is None)
        if settings is None:
            print(serving_line(st[0], proto.name, svc.hosts), file=sys.stderr)
        else:
            g = st[0].get("gallery") or {}
            print(f"running many-source service in {layout.root} ({proto.name}"
                  f"{', the dealer as a third process' if proto.dealer is not None else ''}): gallery of "
                  f"{g.get('persons', 0)} persons from {g.get('sources', 0)} sources, embedder "
                  f"{settings['embedder']}, thresholds calibrated on public faces (models/thresholds.json); clients: invoke contribute --as NAME "
                  "--dataset DIR, invoke predict --as NAME --image P. Ctrl-C or SIGTERM stops it.", file=sys.stderr)
        stopped = svc.watch(done)
        if stopped is not None:
            raise Exit(f"server {stopped[0]} stopped with code {stopped[1]} (see its log lines above)", code=1)
    except ServiceError as exc:
        raise Exit(f"the local service did not start: {exc}", code=1)
    finally:
        codes = svc.stop()
    print(f"stopped (servers exited with {codes[0]} and {codes[1]})", file=sys.stderr)


def serving_line(status: dict, protocol_name: str, hosts) -> str:
    """What the local `invoke serve` says once it answers: the model, and which port is which."""
    from orchestration.shared.ports import ServicePorts

    ports = ServicePorts(hosts)
    (a0, c0), (a1, c1) = ports.client(0), ports.client(1)
    return (f"running service: model generation {status['gen']} ({status['c']} classes, {protocol_name}); clients "
            f"connect to server 0's gateway at {a0}:{c0} and server 1's at {a1}:{c1} (each server's MPC port + 100; "
            f"the servers compute on {hosts[0].port} and {hosts[1].port}, which clients never use). Clients on "
            "this machine use it with service.hosts: local. Ctrl-C or SIGTERM stops it.")


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
    _say_next(sent)


@task(iterable=["image"], help={
    "out": "folder for the two bundles: OUT/server0 and OUT/server1",
    "image": "an image to recognise (repeat for several)",
    "dir": "a folder of images to recognise",
    "threshold": "top logit z_max below which a face is unknown_person (default: the one chosen at training)",
    "backend": "embedder: facenet | dlib (must match training)",
    "detector": "face detector: hog | cnn | cascade (HOG, the CNN only where HOG finds no face)",
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
    _say_next(sent)


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
    _say_next(sent)


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
        out.writerow(["path", "name", "confidence", "score"])
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

