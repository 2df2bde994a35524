"""A test PKI made with the openssl CLI: CAs, leaf certificates (server, client or both) with
DNS and IP subject alternative names, self-signed certificates, and their SHA-256 fingerprints
(of the certificate and of its SubjectPublicKeyInfo), as the `fingerprint` TLS level pins them.

A test module that needs a fixed set of them declares it as `PKI = Spec(...)` and takes the
`pki` fixture (conftest.py), which builds the set with `make_pki`.
"""

import hashlib
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


def _openssl(*args: str, cwd: Path, input: bytes | None = None) -> bytes:
    return subprocess.run(
        ["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30, input=input
    ).stdout


def make_ca(d: Path, name: str) -> Path:
    """A CA `name` in `d`: `name.pem` (certificate) and `name.key`."""
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "30", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )
    return d / f"{name}.pem"


def _san(names) -> str:
    out = []
    for n in names:
        kind = "IP" if n.replace(".", "").isdigit() or ":" in n else "DNS"
        out.append(f"{kind}:{n}")
    return ",".join(out)


def make_leaf(
    d: Path, ca: str, name: str, cn: str, usage: str = "clientAuth", sans=None
) -> tuple[Path, Path]:
    """A certificate for `cn` signed by CA `ca` (in `d`); returns (cert, key) paths.

    `usage` is the extendedKeyUsage (`serverAuth,clientAuth` for a gateway that is both);
    `sans` the subject alternative names (default: `cn`); IP addresses become IP SANs."""
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}/O=Sealgate Test",
        cwd=d,
    )
    (d / f"{name}.ext").write_text(
        f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n"
        f"subjectAltName={_san(sans or [cn])}\n"
    )
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "30", "-extfile", f"{name}.ext",
        cwd=d,
    )
    return d / f"{name}.pem", d / f"{name}.key"


def make_self_signed(d: Path, name: str, cn: str, sans=None) -> tuple[Path, Path]:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "30", "-subj", f"/CN={cn}",
        "-addext", f"subjectAltName={_san(sans or [cn])}",
        cwd=d,
    )
    return d / f"{name}.pem", d / f"{name}.key"


def der_of(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def cert_sha256(pem: Path) -> str:
    """SHA-256 of the certificate (DER), lower-case hex."""
    return hashlib.sha256(der_of(pem)).hexdigest()


def spki_sha256(pem: Path) -> str:
    """SHA-256 of the certificate's SubjectPublicKeyInfo (DER), lower-case hex."""
    pub = _openssl("x509", "-in", str(pem), "-noout", "-pubkey", cwd=pem.parent)
    der = _openssl("pkey", "-pubin", "-outform", "DER", cwd=pem.parent, input=pub)
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class Leaf:
    """A leaf certificate for `make_pki`: the arguments of `make_leaf` after the directory."""

    ca: str
    name: str  # file stem: name.pem, name.key
    cn: str
    usage: str = "clientAuth"
    sans: tuple[str, ...] | None = None  # default: (cn,)


@dataclass(frozen=True)
class Spec:
    """A test module's PKI: CAs (the first is `pki["ca"]`) and leaves by key.

    `scope` is the `pki` fixture's lifetime for the module: "function" (fresh keys for each
    test, under the test's tmp_path) or "module" (made once, shared by the module's tests)."""

    cas: tuple[str, ...]
    leaves: dict[str, Leaf] = field(default_factory=dict)
    scope: str = "function"

    def __post_init__(self):
        assert self.cas, "a PKI needs at least one CA"
        assert self.scope in ("function", "module"), self.scope
        clash = {"dir", "ca", "cas"} & set(self.leaves)
        assert not clash, f"leaf keys {clash} are taken by make_pki"


def make_pki(d: Path, spec: Spec) -> dict:
    """Builds `spec` in `d`. Returns {"dir": d, "ca": first CA's PEM, "cas": {name: PEM},
    and for each leaf key: (cert, key) paths}."""
    cas = {name: make_ca(d, name) for name in spec.cas}
    out: dict = {"dir": d, "ca": cas[spec.cas[0]], "cas": cas}
    for k, leaf in spec.leaves.items():
        assert leaf.ca in cas, f"leaf {k!r}: CA {leaf.ca!r} is not in the spec"
        out[k] = make_leaf(d, leaf.ca, leaf.name, leaf.cn, usage=leaf.usage,
                           sans=list(leaf.sans) if leaf.sans else None)
    return out
