"""A throwaway certificate authority made with ``openssl``, for the TLS tests.

:func:`make_pki` writes, in about half a second (EC P-256 keys):

- ``ca``: the lab's CA (self-signed, ``CA:TRUE``), which signs the rest;
- ``other-ca``: a second, unrelated CA (the wrong CA to trust);
- ``server``: the broker's certificate, for ``localhost`` and ``127.0.0.1`` (subjectAltName);
- ``server-expired``: the same names, expired (``openssl x509 -days -1``: its notAfter is a
  day before its notBefore, which is now);
- ``client``: a client certificate (extendedKeyUsage clientAuth) for brokers that require one;
- ``client-expired``: the same, expired.

Each as ``NAME.pem`` (certificate) and ``NAME.key`` (unencrypted private key).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: How long the good certificates are valid (days).
VALID_DAYS = 2
_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def available() -> str | None:
    """Why no CA can be made here, or None when it can."""
    return None if shutil.which("openssl") else "openssl not on PATH"


@dataclass(frozen=True)
class Pki:
    """The files of :func:`make_pki` under ``root``."""

    root: Path

    def cert(self, name: str) -> Path:
        return self.root / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.root / f"{name}.key"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _make_ca(pki: Pki, name: str) -> None:
    _openssl("req", "-x509", *_EC_KEY, "-keyout", str(pki.key(name)),
             "-out", str(pki.cert(name)), "-days", str(VALID_DAYS), "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _make_leaf(pki: Pki, name: str, *, names: str, usage: str, days: int, serial: int) -> None:
    csr, extensions = pki.root / f"{name}.csr", pki.root / f"{name}.ext"
    _openssl("req", "-new", *_EC_KEY, "-keyout", str(pki.key(name)), "-out", str(csr),
             "-subj", f"/CN={name}")
    extensions.write_text(f"subjectAltName={names}\nextendedKeyUsage={usage}\n"
                          "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(pki.cert("ca")),
             "-CAkey", str(pki.key("ca")), "-set_serial", str(serial), "-days", str(days),
             "-extfile", str(extensions), "-out", str(pki.cert(name)))


def make_pki(root: Path) -> Pki:
    """Write the CA and certificates listed in the module docstring under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    pki = Pki(root)
    _make_ca(pki, "ca")
    _make_ca(pki, "other-ca")
    server_names = "DNS:localhost,IP:127.0.0.1"
    _make_leaf(pki, "server", names=server_names, usage="serverAuth", days=VALID_DAYS,
               serial=1)
    _make_leaf(pki, "server-expired", names=server_names, usage="serverAuth", days=-1,
               serial=2)
    _make_leaf(pki, "client", names="DNS:chiffon-agent", usage="clientAuth",
               days=VALID_DAYS, serial=3)
    _make_leaf(pki, "client-expired", names="DNS:chiffon-agent", usage="clientAuth", days=-1,
               serial=4)
    return pki
