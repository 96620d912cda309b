"""`fedveil keys init`: provision every role's key bundle, and load bundles back into keyrings.

One command creates, per federation:
- a CA and a SuperLink TLS certificate whose SANs cover the configured hosts (always 127.0.0.1 and localhost);
- an EC (P-384, OpenSSH format) SuperNode authentication keypair per node, as Flower expects;
- an X25519 keypair per proxy and the CKKS contexts (via `fedveil.secure.keys`);
- a manifest mapping proxy ids to public keys, given to every organization out of band.

Bundles (private files mode 0600)::

    OUT/server/   ca.pem superlink.pem superlink.key ckks_secret.ctx supernodes/<node>.pub
    OUT/<proxy>/  ca.pem supernode.key supernode.pub proxies/<proxy>/x25519.{key,pub} ckks/public.ctx
    OUT/<org>/    ca.pem supernode.key supernode.pub manifest.json ckks/public.ctx

The CKKS secret key goes only into the server's bundle; no proxy private key leaves its own bundle.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import tempfile
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedveil.platform.errors import ConfigError, FedveilError
from fedveil.secure.modes import ClientKeyring, ProxyKeyring, ServerKeyring

SERVER = "server"
CERT_DAYS = 825


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedveil"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(federation: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(_name(f"fedveil CA ({federation})")).issuer_name(_name(f"fedveil CA ({federation})"))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["127.0.0.1", "localhost", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_server_cert(ca_key, ca_cert: x509.Certificate, hosts: Sequence[str]):
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(_name("fedveil SuperLink")).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_supernode_keypair() -> tuple[bytes, bytes]:
    """(private OpenSSH, public OpenSSH): the format `flower-supernode --auth-supernode-private-key` reads."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public


def _check_names(proxies: Sequence[str], orgs: Sequence[str]) -> None:
    from fedveil.secure.keys import _check_id

    names = list(proxies) + list(orgs)
    if SERVER in names:
        raise ConfigError("'server' is reserved for the server's bundle", "rename that proxy or organization")
    if len(set(names)) != len(names):
        raise ConfigError(f"proxy and organization names must be distinct: {names}", "rename the duplicates")
    if len(proxies) < 1:
        raise ConfigError("at least one proxy is needed", "pass --proxies N (2 or more for secret-sharing)")
    for n in names:
        try:
            _check_id(n)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{n!r} cannot name a key bundle ({exc})", "use letters, digits, '.', '_' and '-'") from None


def init_federation_keys(out: str | Path, proxies: Sequence[str], orgs: Sequence[str], hosts: Sequence[str] = (),
                         federation: str = "fedveil", ckks: bool = True, ckks_poly_degree: int = 8192,
                         overwrite: bool = False) -> Path:
    """Create every role's bundle under `out` (see the module docstring); returns `out`."""
    from fedveil.secure import keys as secure_keys

    out = Path(out)
    _check_names(proxies, orgs)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FedveilError(f"{out} already holds keys", "choose another --out, or pass --force to replace them")
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(federation)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    srv_key, srv_cert = make_server_cert(ca_key, ca_cert, hosts)
    server = out / SERVER
    _write(server / "ca.pem", ca_pem, False)
    _write(server / "superlink.pem", srv_cert.public_bytes(serialization.Encoding.PEM), False)
    _write(server / "superlink.key", _pem_key(srv_key), True)

    with tempfile.TemporaryDirectory(prefix="fedveil-keys-") as tmp:
        coeffs = (60, 40, 40, 60) if ckks_poly_degree == 8192 else (60, 49)
        manifest = secure_keys.init_keys(tmp, proxies, ckks=ckks, poly_degree=ckks_poly_degree, coeff_bits=coeffs)
        if ckks:
            _write(server / "ckks_secret.ctx", (Path(tmp) / secure_keys.CKKS_SECRET).read_bytes(), True)
        for name in list(proxies) + list(orgs):
            bundle = out / name
            _write(bundle / "ca.pem", ca_pem, False)
            private, public = make_supernode_keypair()
            _write(bundle / "supernode.key", private, True)
            _write(bundle / "supernode.pub", public, False)
            _write(server / "supernodes" / f"{name}.pub", public, False)
            if ckks:
                _write(bundle / secure_keys.CKKS_PUBLIC, (Path(tmp) / secure_keys.CKKS_PUBLIC).read_bytes(), False)
            if name in proxies:
                for suffix, private_file in (("key", True), ("pub", False)):
                    src = Path(tmp) / "proxies" / name / f"x25519.{suffix}"
                    _write(bundle / "proxies" / name / f"x25519.{suffix}", src.read_bytes(), private_file)
            else:
                _write(bundle / "manifest.json", manifest.read_bytes(), False)
    return out


# ---- loading bundles into keyrings ---------------------------------------------------------------
def _optional(path: Path) -> Path | None:
    return path if path.exists() else None


def load_client_keyring_dir(bundle: str | Path) -> ClientKeyring:
    from fedveil.secure import keys as secure_keys

    bundle = Path(bundle)
    return secure_keys.load_client_keyring(bundle / "manifest.json", _optional(bundle / secure_keys.CKKS_PUBLIC))


def load_proxy_keyring_dir(bundle: str | Path, proxy_id: str) -> ProxyKeyring:
    from fedveil.secure import keys as secure_keys

    bundle = Path(bundle)
    return secure_keys.load_proxy_keyring(bundle, proxy_id, _optional(bundle / secure_keys.CKKS_PUBLIC))


def load_server_keyring_dir(bundle: str | Path) -> ServerKeyring:
    from fedveil.secure import keys as secure_keys

    return secure_keys.load_server_keyring(_optional(Path(bundle) / "ckks_secret.ctx"))


# ---- CLI -------------------------------------------------------------------------------------------
def _cmd_init(args: argparse.Namespace) -> int:
    proxies = [p for p in (args.proxy_names.split(",") if args.proxy_names else
                           [f"proxy-{i + 1}" for i in range(args.proxies)]) if p]
    orgs = [o.strip() for o in args.orgs.split(",") if o.strip()]
    if not orgs:
        raise ConfigError("--orgs is empty", "pass the organizations, e.g. --orgs hospital-a,hospital-b")
    hosts = [h.strip() for h in (args.hosts or "").split(",") if h.strip()]
    out = init_federation_keys(args.out, proxies, orgs, hosts, ckks=not args.no_ckks,
                               ckks_poly_degree=args.ckks_poly_degree, overwrite=args.force)
    print(f"provisioned {len(proxies)} proxies and {len(orgs)} organizations in {out}")
    print(f"  {out / SERVER}: SuperLink TLS, CKKS secret key, SuperNode public keys -> the server operator only")
    for p in proxies:
        print(f"  {out / p}: proxy {p}'s X25519 private key and SuperNode key -> that proxy's operator only")
    for o in orgs:
        print(f"  {out / o}: manifest of proxy public keys and SuperNode key -> organization {o} only")
    return 0


def add_keys_parser(sub) -> None:
    keys = sub.add_parser("keys", help="provision TLS, SuperNode auth, proxy and CKKS keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_sub.add_parser("init", help="create every role's key bundle")
    init.add_argument("--out", required=True, help="directory for the bundles")
    init.add_argument("--proxies", type=int, default=2, help="number of proxies (named proxy-1..N)")
    init.add_argument("--proxy-names", help="comma-separated proxy names (instead of --proxies)")
    init.add_argument("--orgs", required=True, help="comma-separated organization names")
    init.add_argument("--hosts", help="extra SuperLink host names or IPs for the TLS certificate")
    init.add_argument("--ckks-poly-degree", type=int, choices=(4096, 8192), default=8192)
    init.add_argument("--no-ckks", action="store_true", help="skip the CKKS context (secret-sharing only)")
    init.add_argument("--force", action="store_true", help="replace existing keys in --out")
    init.set_defaults(func=_cmd_init)
