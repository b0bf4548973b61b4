"""Finding MP-SPDZ and compiling our .mpc programs into a project-owned folder.

The MP-SPDZ installation is read-only to us: ``compile.py`` runs with the project's build
folder as working directory, so bytecode and schedules land in ``<build>/Programs``.
Compiled programs are cached by (source hash, arguments, MP-SPDZ version) and rebuilt
when either changes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from preprocessing.fileio import atomic_write_json, atomic_write_text, owner_only

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
PROGRAMS_SRC = REPO / "mpc_programs"
DEFAULT_HOME = Path("/opt/mp-spdz")
PARTY_BINARY = "semi2k-party.x"


@dataclass(frozen=True)
class Protocol:
    """How the servers compute: which MP-SPDZ binary, compiler flags and number of parties.

    ``dealer``: the client, trusted data owner, runs as a third party (the last one) that only deals
    correlated randomness (multiplication and matrix triples, random bits and edaBits, drawn from its
    CSPRNG for this run alone) and receives nothing secret; the two servers run the semi-honest
    online phase on Z_2^64. ``semi2k``: the two servers make that randomness themselves with
    oblivious transfer, for deployments where the client cannot stay online or deal.
    """

    name: str
    binary: str
    compile_flags: tuple[str, ...]
    n_parties: int
    always_tls: bool  # dealer-ring-party.x always encrypts (its -u needs a build with -DINSECURE); semi2k needs -e

    @property
    def summary(self) -> str:
        if self.dealer is not None:
            return "the client deals the servers' preprocessing as party 2"
        return "the servers make their own preprocessing by oblivious transfer"

    @property
    def dealer(self) -> int | None:
        """The dealer's party number (the client), or None."""
        return self.n_parties - 1 if self.n_parties > 2 else None


DEALER_BINARY = "dealer-ring-party.x"  # two computing parties plus a dealer (-N 3)
PROTOCOLS: dict[str, Protocol] = {
    "dealer": Protocol("dealer", DEALER_BINARY, ("-E", "dealer-ring"), 3, always_tls=True),
    "semi2k": Protocol("semi2k", PARTY_BINARY, ("-E", "semi2k"), 2, always_tls=False),
}
DEFAULT_PROTOCOL = "dealer"


def protocol(name: str | None) -> Protocol:
    """The protocol called ``name`` (None: the default); the error lists the allowed names."""
    key = DEFAULT_PROTOCOL if name in (None, "") else str(name)
    if key not in PROTOCOLS:
        raise MPSPDZError(f"protocol {name!r} is not one of: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[key]

INSTALL_HELP = (
    "Run `invoke setup`: it installs MP-SPDZ there (the official binary release, checksum verified; offline "
    "`invoke setup --archive FILE.tar.xz`; or a build of your own MP-SPDZ source tree with "
    "`invoke setup --from-source DIR`) and checks that semi2k-party.x and dealer-ring-party.x run. "
    "Or point MP_SPDZ_HOME (or `mpspdz.home` in invoke.yaml) at an MP-SPDZ folder that has them."
)


class MPSPDZError(RuntimeError):
    """MP-SPDZ is missing, broken, or a program failed to compile or run."""


@dataclass(frozen=True)
class MPSPDZ:
    home: Path

    @property
    def party_binary(self) -> Path:
        return self.home / PARTY_BINARY

    def binary(self, proto: Protocol) -> Path:
        return self.home / proto.binary

    @property
    def compiler(self) -> Path:
        return self.home / "compile.py"

    def version(self) -> str:
        """A stable identifier of this installation (changes when the binary changes)."""
        st = self.party_binary.stat()
        return f"{st.st_size}-{int(st.st_mtime)}"


def mpspdz_home(configured: str | os.PathLike[str] | None = None) -> tuple[Path, str]:
    """Where MP-SPDZ is looked for, and why: $MP_SPDZ_HOME, else ``configured`` (invoke.yaml), else /opt/mp-spdz."""
    env = os.environ.get("MP_SPDZ_HOME")
    if env:
        home, source = Path(env), "MP_SPDZ_HOME"
    elif configured:
        home, source = Path(configured), "mpspdz.home in invoke.yaml"
    else:
        home, source = DEFAULT_HOME, "the default location"
    return home.expanduser().resolve(), source


def find_mpspdz(configured: str | os.PathLike[str] | None = None) -> MPSPDZ:
    """Locate MP-SPDZ (see :func:`mpspdz_home`) and check it has both party binaries and the compiler."""
    home, source = mpspdz_home(configured)
    missing = []
    if not home.is_dir():
        missing.append(f"folder {home}")
    else:
        for rel in (PARTY_BINARY, DEALER_BINARY, "compile.py", "Compiler"):
            if not (home / rel).exists():
                missing.append(str(home / rel))
        for name in (PARTY_BINARY, DEALER_BINARY):
            binary = home / name
            if binary.exists() and not os.access(binary, os.X_OK):
                missing.append(f"{binary} is not executable")
    if missing:
        raise MPSPDZError(f"MP-SPDZ not usable at {home} (from {source}): missing {', '.join(missing)}. {INSTALL_HELP}")
    return MPSPDZ(home)


def program_source(name: str) -> Path:
    path = PROGRAMS_SRC / f"{name}.mpc"
    if not path.is_file():
        allowed = sorted(p.stem for p in PROGRAMS_SRC.glob("*.mpc"))
        raise MPSPDZError(f"no MPC program {name!r}; available: {', '.join(allowed)}")
    return path


def program_version(name: str) -> str:
    """Hash of the program source; travels in manifests so stale shares are caught."""
    return hashlib.sha256(program_source(name).read_bytes()).hexdigest()[:16]


#: Compiler flags per program, beside the protocol's. face_predict: MP-SPDZ carries out the binary circuit of
#: a long vector of comparisons in a loop that is unrolled only up to the loop budget (default 1,000), and
#: every further chunk of the vector costs the circuit's rounds again, so a batch cost more rounds than one
#: query (compiler's count, dealer-ring, C=291: 54 rounds for 1 query, 175 for 16, 579 for 64). With a budget
#: of 10^7 the whole vector is one chunk: 47 rounds for 1 and for 64 queries; C=1,000: 57 for 1 and 64;
#: C=10,000: 70 for 1 and 64 (compiling that takes 42 s and 1.3 GB, once per size). gallery_enrol: 35 rounds
#: for 1, 10 and 20 photos (54 and 80 before). face_train (N=2,000, C=291, 1 epoch): 26,115 -> 11,012 rounds
#: with a budget of 10^4, compiling in 8.7 s instead of 7.7 (10^7 would save 550 rounds more for 30 s and 1 GB).
PROGRAM_FLAGS: dict[str, tuple[str, ...]] = {
    "face_predict": ("--budget", "10000000"),
    "gallery_enrol": ("--budget", "10000000"),
    "face_train": ("--budget", "10000"),
}


def compiled_name(name: str, args: list[str]) -> str:
    return "-".join([name, *args])


def programs_dir(build_dir: Path, proto: Protocol) -> Path:
    """Where programs compiled for ``proto`` live (bytecode differs between protocols)."""
    return Path(build_dir) / proto.name / "Programs"


@owner_only()  # under var/build: owner-only like the rest of var/
def compile_program(mp: MPSPDZ, name: str, args: list[str], build_dir: Path, force: bool = False,
                    proto: Protocol | None = None) -> str:
    """Compile ``mpc_programs/<name>.mpc`` with ``args`` for ``proto``; returns the compiled program name.

    The result goes to :func:`programs_dir`. Skips compilation when the cached result was made from
    the same source, arguments, protocol and MP-SPDZ installation.
    """
    proto = proto or protocol(None)
    src = program_source(name)
    build_dir = Path(build_dir) / proto.name
    build_dir.mkdir(parents=True, exist_ok=True)
    full = compiled_name(name, args)
    stamp_path = build_dir / "stamps" / f"{full}.json"
    flags = list(proto.compile_flags) + list(PROGRAM_FLAGS.get(name, ()))
    stamp = {"source": program_version(name), "args": args, "mpspdz": mp.version(), "flags": flags}
    schedule = build_dir / "Programs" / "Schedules" / f"{full}.sch"
    if not force and schedule.exists() and stamp_path.exists():
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                logger.debug("compiled program %s is up to date", full)
                return full
        except json.JSONDecodeError:
            pass
    logger.info("compiling %s %s", name, " ".join(args))
    cmd = [sys.executable, str(mp.compiler), *flags, str(src), *args]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # no __pycache__ inside the MP-SPDZ folder
    proc = subprocess.run(cmd, cwd=build_dir, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not schedule.exists():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise MPSPDZError(f"compiling {src} with arguments {args} failed (exit {proc.returncode}):\n{tail}")
    atomic_write_text(build_dir / "stamps" / f"{full}.log", proc.stdout + proc.stderr)
    atomic_write_json(stamp_path, stamp)
    return full
