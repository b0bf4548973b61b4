"""MP-SPDZ's official release online: which file to download, and the sha256 GitHub publishes for it.

GitHub's releases API (``GET /repos/data61/MP-SPDZ/releases/tags/v<version>``) lists a release's assets, each
with ``name``, ``browser_download_url`` and ``digest`` (``"sha256:<hex>"``, computed by GitHub when the file
was uploaded). :func:`find_asset` asks it over HTTPS (certificate verified), :func:`download` fetches the asset
over HTTPS into an open file; the caller compares the digest (see ``install.py``).

``MPSPDZ_RELEASE_API`` replaces the API's base URL (default ``https://api.github.com``; a mirror or a test
server, HTTPS only). The certificates trusted are the system's (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` are
honoured, as OpenSSL does) or, when given, exactly those in ``cafile``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import BinaryIO

from orchestration.mpspdz.archive import SetupError

logger = logging.getLogger(__name__)

REPOSITORY = "data61/MP-SPDZ"
DEFAULT_API = "https://api.github.com"
API_ENV = "MPSPDZ_RELEASE_API"
TIMEOUT = 60.0
MAX_API_ANSWER = 4 << 20  # bytes; a release's JSON is a few kB
_DIGEST = re.compile(r"^sha256:([0-9a-fA-F]{64})$")


@dataclass(frozen=True)
class Asset:
    name: str
    url: str  # browser_download_url
    sha256: str | None  # GitHub's digest; None when the API gives none


def api_base(api: str | None = None) -> str:
    """The releases API's base URL: ``api``, else ``$MPSPDZ_RELEASE_API``, else GitHub's."""
    return (api or os.environ.get(API_ENV) or DEFAULT_API).rstrip("/")


def release_api_url(version: str, api: str | None = None) -> str:
    return f"{api_base(api)}/repos/{REPOSITORY}/releases/tags/v{version}"


def _https_only(url: str, what: str) -> None:
    if urllib.parse.urlsplit(url).scheme != "https":
        raise SetupError(f"{what} {url!r}: only https:// is accepted (the certificate is verified)")


class _HttpsRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects (GitHub sends downloads to its storage host) only to https:// URLs."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _https_only(newurl, f"{req.full_url} redirects to")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(cafile: str | os.PathLike | None) -> urllib.request.OpenerDirector:
    try:
        context = ssl.create_default_context(cafile=os.fspath(cafile) if cafile else None)
    except (OSError, ssl.SSLError) as exc:
        raise SetupError(f"cannot load the trusted certificates {cafile or '(the system store)'}: {exc}")
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _HttpsRedirects())


def _offline_hint() -> str:
    return ("; offline, install from an archive with `invoke setup --archive FILE`, or build with "
            "`invoke setup --from-source DIR`")


def find_asset(version: str, name: str, *, api: str | None = None,
               cafile: str | os.PathLike | None = None) -> Asset:
    """The asset ``name`` of release ``v<version>`` as the releases API lists it."""
    url = release_api_url(version, api)
    _https_only(url, f"the releases API ({API_ENV})")
    request = urllib.request.Request(url, headers={"Accept": "application/vnd.github+json",
                                                   "User-Agent": "private-face-recognition-setup"})
    logger.info("asking %s for %s", url, name)
    try:
        with _opener(cafile).open(request, timeout=TIMEOUT) as resp:
            body = resp.read(MAX_API_ANSWER + 1)
    except SetupError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SetupError(f"cannot ask GitHub for MP-SPDZ's release v{version} at {url} ({exc})" + _offline_hint())
    if len(body) > MAX_API_ANSWER:
        raise SetupError(f"{url}: the answer is larger than {MAX_API_ANSWER} bytes, not a release description")
    try:
        release = json.loads(body)
        assets = release["assets"]
        if not isinstance(assets, list):
            raise TypeError("assets is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        raise SetupError(f"{url}: expected a GitHub release as JSON with an 'assets' list ({exc})")
    found = [a for a in assets if isinstance(a, dict) and a.get("name") == name]
    if not found:
        have = ", ".join(str(a.get("name")) for a in assets if isinstance(a, dict)) or "none"
        raise SetupError(f"{url}: release v{version} has no asset {name} (it has: {have}); nothing was installed")
    asset = found[0]
    download = asset.get("browser_download_url")
    if not isinstance(download, str) or not download:
        raise SetupError(f"{url}: asset {name} has no browser_download_url")
    _https_only(download, f"{url}: asset {name}'s browser_download_url")
    digest = asset.get("digest")
    if digest in (None, ""):
        return Asset(name, download, None)
    m = _DIGEST.match(str(digest))
    if not m:
        raise SetupError(f"{url}: asset {name} has digest {digest!r}, expected 'sha256:' and 64 hex digits")
    return Asset(name, download, m.group(1).lower())


def download(url: str, out: BinaryIO, *, cafile: str | os.PathLike | None = None) -> None:
    """Write the HTTPS resource ``url`` into the open file ``out``."""
    _https_only(url, "download")
    logger.info("downloading %s", url)
    request = urllib.request.Request(url, headers={"User-Agent": "private-face-recognition-setup"})
    try:
        with _opener(cafile).open(request, timeout=TIMEOUT) as resp:
            shutil.copyfileobj(resp, out, 1 << 20)
    except SetupError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SetupError(f"cannot download {url} ({exc})" + _offline_hint())
