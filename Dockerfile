# syntax=docker/dockerfile:1
#
# Private face recognition on MP-SPDZ (semi2k): runtime image and containerised CI.
#
#   docker build --build-arg MPSPDZ_SHA256=<sha256> --target runtime -t private-face-recognition .
#   docker build --build-arg MPSPDZ_SHA256=<sha256> --target test .   # the tests; a failure fails the build
#
# Stages:
#   base            Debian bookworm + what semi2k-party.x, the TLS tooling and the project need at run time
#   python-build    the Python stack in /opt/venv (dependencies only, cached on pyproject.toml)
#   mpspdz-release  downloads MP-SPDZ's official binary release and verifies its sha256
#   mpspdz-dist     the files the image keeps from MP-SPDZ (semi2k-party.x, dealer-ring-party.x, compile.py,
#                   Compiler/)
#   runtime         non-root user, MP-SPDZ at /opt/mp-spdz, the project at /src
#   test            runtime + the protocol tests, run during the build
#
# Where MP-SPDZ comes from: by default the official release (stage mpspdz-release). To use a
# local build instead, supply a build context with the same name as the stage; the stage is then
# replaced and never runs, so nothing is downloaded (BuildKit and buildah both do this):
#   --build-context mpspdz-dist=/path/to/dir   # semi2k-party.x dealer-ring-party.x [libSPDZ.so] compile.py Compiler/
#
# Optional extra CA for TLS-intercepting proxies (used only while downloading, never stored in the image):
#   --secret id=extra_ca,src=/path/to/ca.pem
#
# See docs/docker.md.

ARG BASE_IMAGE=debian:bookworm-slim

###############################################################################
FROM ${BASE_IMAGE} AS base

ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8

# python3: bookworm's 3.11, the interpreter of the venv.
# openssl: TLS certificates for the parties (including `openssl x509 -hash`).
# gcc, libc6-dev: the project compiles a small LD_PRELOAD shim on first use.
# libgmp*, libsodium, libssl, libboost-*, zlib/bz2/lzma/zstd: what a source build of semi2k-party.x
#   links against (what the official release's binaries need was not checked: they could not be downloaded here).
# tini: PID 1 that forwards signals and reaps the party processes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        ca-certificates \
        gcc \
        iproute2 \
        libboost-filesystem1.81.0 \
        libboost-iostreams1.81.0 \
        libbz2-1.0 \
        libc6-dev \
        libgmp10 \
        libgmpxx4ldbl \
        liblzma5 \
        libsodium23 \
        libssl3 \
        libzstd1 \
        openssl \
        python3 \
        tini \
        zlib1g \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

###############################################################################
FROM base AS python-build

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Only pyproject.toml: the dependency layer is rebuilt when the dependencies change, not the code.
COPY pyproject.toml /tmp/project/pyproject.toml

# The dependencies of `pip install /src[test]`, taken from pyproject.toml. The project itself is
# installed (editable) in the runtime stage, where its source is.
# The extra CA, when given, is appended to the system bundle for this RUN only.
RUN --mount=type=secret,id=extra_ca \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    set -eu; \
    if [ -s /run/secrets/extra_ca ]; then \
        cat /etc/ssl/certs/ca-certificates.crt /run/secrets/extra_ca > /tmp/ca-bundle.pem; \
        export PIP_CERT=/tmp/ca-bundle.pem REQUESTS_CA_BUNDLE=/tmp/ca-bundle.pem SSL_CERT_FILE=/tmp/ca-bundle.pem; \
    fi; \
    python -c 'import tomllib; p = tomllib.load(open("/tmp/project/pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["test"]))' \
        > /tmp/project/requirements.txt; \
    cat /tmp/project/requirements.txt; \
    python -m pip install --disable-pip-version-check --upgrade pip 'setuptools>=68' wheel; \
    python -m pip install --disable-pip-version-check -r /tmp/project/requirements.txt; \
    rm -rf /tmp/project /tmp/ca-bundle.pem

###############################################################################
FROM base AS mpspdz-release

ARG MPSPDZ_VERSION=0.4.2
# sha256 of mp-spdz-${MPSPDZ_VERSION}.tar.xz. No default: it must come from a download you trust
# (see docs/docker.md). The build stops before downloading anything when it is missing.
ARG MPSPDZ_SHA256=
# Where to download the release from; empty means MP-SPDZ's GitHub release page. A mirror must
# serve the identical file: the checksum is verified either way.
ARG MPSPDZ_URL=
# Which prebuilt binary to keep: amd64 runs on any x86-64 with AES-NI; adx (AVX2/BMI2/ADX,
# Broadwell/Zen or newer) is faster but only runs on such CPUs. auto = what this build machine has,
# as MP-SPDZ's Scripts/tldr.sh decides.
ARG MPSPDZ_CPU=amd64

RUN if ! printf '%s' "${MPSPDZ_SHA256}" | grep -Eqx '[0-9a-fA-F]{64}'; then \
        echo "ERROR: build argument MPSPDZ_SHA256 must be the sha256 (64 hex digits) of mp-spdz-${MPSPDZ_VERSION}.tar.xz," >&2; \
        echo "       got '${MPSPDZ_SHA256}'. Pass --build-arg MPSPDZ_SHA256=<hex> (see docs/docker.md)," >&2; \
        echo "       or supply a local MP-SPDZ with --build-context mpspdz-dist=<dir>." >&2; \
        exit 1; \
    fi; \
    case "${MPSPDZ_CPU}" in amd64|adx|auto) ;; \
        *) echo "ERROR: MPSPDZ_CPU must be amd64, adx or auto, got '${MPSPDZ_CPU}'" >&2; exit 1;; \
    esac

RUN apt-get update \
 && apt-get install -y --no-install-recommends curl xz-utils \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

RUN --mount=type=secret,id=extra_ca \
    set -eu; \
    cacert=""; \
    if [ -s /run/secrets/extra_ca ]; then \
        cat /etc/ssl/certs/ca-certificates.crt /run/secrets/extra_ca > /tmp/ca-bundle.pem; \
        cacert="--cacert /tmp/ca-bundle.pem"; \
    fi; \
    url="${MPSPDZ_URL:-https://github.com/data61/MP-SPDZ/releases/download/v${MPSPDZ_VERSION}/mp-spdz-${MPSPDZ_VERSION}.tar.xz}"; \
    echo "downloading $url"; \
    curl -fsSL --retry 3 $cacert -o /tmp/mp-spdz.tar.xz "$url"; \
    echo "${MPSPDZ_SHA256}  /tmp/mp-spdz.tar.xz" | sha256sum -c -; \
    mkdir /tmp/mp-spdz; \
    tar -xJf /tmp/mp-spdz.tar.xz -C /tmp/mp-spdz --strip-components=1; \
    cpu="${MPSPDZ_CPU}"; \
    if [ "$cpu" = auto ]; then \
        if grep -qw adx /proc/cpuinfo; then cpu=adx; else cpu=amd64; fi; \
    fi; \
    bin="/tmp/mp-spdz/bin/Linux-$cpu"; \
    for x in semi2k-party.x dealer-ring-party.x; do \
        test -x "$bin/$x" || { echo "ERROR: $bin/$x is not in the release" >&2; exit 1; }; \
    done; \
    mkdir /out; \
    cp "$bin/semi2k-party.x" "$bin/dealer-ring-party.x" /out/; \
    if [ -e "$bin/libSPDZ.so" ]; then cp "$bin/libSPDZ.so" /out/; fi; \
    cp /tmp/mp-spdz/compile.py /out/; \
    cp -r /tmp/mp-spdz/Compiler /out/Compiler; \
    if [ -e /tmp/mp-spdz/License.txt ]; then cp /tmp/mp-spdz/License.txt /out/; fi; \
    chmod -R u=rwX,go=rX /out; \
    chmod 0755 /out/semi2k-party.x /out/dealer-ring-party.x /out/compile.py; \
    echo "MP-SPDZ ${MPSPDZ_VERSION} ($cpu): $(ls /out | tr '\n' ' ')"; \
    rm -rf /tmp/mp-spdz /tmp/mp-spdz.tar.xz /tmp/ca-bundle.pem

###############################################################################
# The MP-SPDZ files the image keeps. A build context named mpspdz-dist replaces this stage.
FROM scratch AS mpspdz-dist
COPY --from=mpspdz-release /out/ /

###############################################################################
FROM base AS runtime

ARG APP_USER=facerec
ARG APP_UID=10001

LABEL org.opencontainers.image.title="private-face-recognition" \
      org.opencontainers.image.description="Private face recognition on two-party computation (MP-SPDZ semi2k)" \
      org.opencontainers.image.licenses="MIT"

RUN groupadd --gid "${APP_UID}" "${APP_USER}" \
 && useradd --uid "${APP_UID}" --gid "${APP_UID}" --create-home --home-dir "/home/${APP_USER}" \
        --shell /bin/bash "${APP_USER}" \
 && install -d -o "${APP_USER}" -g "${APP_USER}" -m 0750 /work

# MP-SPDZ, read-only for the application user (programs are compiled into the project's build folder).
# Permissions are only touched where wrong: a chmod would copy the 60-100 MB binaries into a new layer.
COPY --from=mpspdz-dist --chown=0:0 / /opt/mp-spdz/
RUN set -eu; \
    cd /opt/mp-spdz; \
    for f in semi2k-party.x dealer-ring-party.x compile.py Compiler/__init__.py; do \
        test -e "$f" || { echo "ERROR: MP-SPDZ supply lacks $f" >&2; exit 1; }; \
    done; \
    find . \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf {} +; \
    find . \( -type d -o -name '*.x' -o -name '*.so' -o -name compile.py \) ! -perm 0755 -exec chmod 0755 {} +; \
    find . -type f \( ! -perm -0444 -o -perm /0022 \) ! -name '*.x' ! -name '*.so' ! -name compile.py -exec chmod 0644 {} +; \
    mkdir -p Player-Data; \
    for x in semi2k-party.x dealer-ring-party.x; do \
        if ldd "$x" 2>&1 | grep 'not found'; then \
            echo "ERROR: $x misses the shared libraries above" >&2; exit 1; \
        fi; \
    done
ENV MP_SPDZ_HOME=/opt/mp-spdz

COPY --from=python-build /opt/venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2

# The project, owned by root and read-only for the application user, except models/ where
# `invoke fetch-models` writes. Installed editable: the code finds mpc_programs/ and
# models/models.json next to itself, so it must run from /src, not from a copy in site-packages.
COPY . /src
RUN set -eu; \
    python -m pip install --disable-pip-version-check --no-deps --no-build-isolation --no-index -e /src; \
    python -m pip check; \
    chown -R "${APP_USER}:${APP_USER}" /src/models; \
    find /src -perm /0022 ! -path '/src/models*' -exec chmod go-w {} +

# Run state (var/: client, server0, server1, build, cache) goes to /work, the writable volume.
ENV INVOKE_PATHS_VAR=/work/var \
    HOME=/home/${APP_USER}

WORKDIR /src
USER ${APP_UID}:${APP_UID}

RUN python -c "from orchestration.mpspdz.toolchain import find_mpspdz; print('MP-SPDZ:', find_mpspdz().home)"

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["invoke", "--list"]

###############################################################################
# The containerised CI: building this stage runs the tests; a failing test fails the build.
FROM runtime AS test

RUN invoke --list > /dev/null
# The protocol tests (synthetic data: no face images or model downloads) against the real
# semi2k-party.x. A failing test fails the build, and so does a run where no test passed at all:
# every test skipped or deselected would prove nothing. Tests that need network namespaces
# (tests/test_two_hosts.py) skip here, with the reason printed: a build step cannot create them.
RUN python -m pytest -m protocol -p no:cacheprovider -q --junitxml=/tmp/protocol-tests.xml \
 && python -c 'import sys, xml.etree.ElementTree as ET; \
r = ET.parse("/tmp/protocol-tests.xml").getroot(); \
s = r if r.tag == "testsuite" else r.find("testsuite"); \
passed = int(s.get("tests")) - sum(int(s.get(k, 0)) for k in ("skipped", "failures", "errors")); \
print(f"{passed} protocol tests passed"); \
sys.exit(0 if passed > 0 else "no protocol test passed: all were skipped")'
