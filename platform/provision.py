"""Key custody: each party makes its own private keys; the operator works from public keys only.

The ceremony (README "Running a real federation across hosts"):

1. Each proxy and each organization, on its own host: `fedveil keys gen --role proxy|org --name NAME
   --out DIR` (`generate_party`) writes, mode 0600, its SuperNode EC P-384 OpenSSH auth key and, for
   a proxy, its X25519 key; and DIR/NAME.public.json (role, name, public keys, SHA-256 fingerprints),
   the only file it hands to the operator.
2. The operator: `fedveil keys init --out OUT --public a.public.json ...` (`build_federation`) makes
   the CA (its private key is never written), the SuperLink TLS certificate, the SuperNode
   registrations, the CKKS contexts (the secret one stays with the server, the decryptor) and the
   manifest of proxy public keys, and prints the manifest's fingerprint. It writes::

       OUT/server/   ca.pem superlink.pem superlink.key ckks_secret.ctx supernodes/<name>.pub manifest.json
       OUT/handout/  ca.pem manifest.json ckks/public.ctx        (public: goes to every proxy and organization)

3. Each party checks the fingerprint out of band and installs the handout: `fedveil keys install
   --bundle HANDOUT --out DIR --manifest-fingerprint FP` (`install_handout`) refuses a manifest that
   does not match, a CA or CKKS context that does not match the manifest, and (for a proxy) a
   manifest that lists another key for it; it pins the fingerprint in DIR/manifest.sha256, which
   every later load checks.

A party's directory (private files mode 0600)::

    DIR/  NAME.public.json supernode.key supernode.pub [proxies/NAME/x25519.{key,pub}]
          ca.pem manifest.json manifest.sha256 ckks/public.ctx     (after install)

`check_custody` refuses a directory that holds any other party's private key; the server's, a
proxy's and an organization's loaders call it, and so does `fedveil server --keys`.
`init_federation_keys` runs the same three steps in one process for single-host use (the demo,
tests): one directory per role under OUT, and each node is given only its own.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import ipaddress
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedveil.platform.errors import ConfigError, FedveilError, SecurityError
from fedveil.secure import keys as secure_keys
from fedveil.secure.keys import _check_id, sha256_hex
from fedveil.secure.modes import ClientKeyring, ProxyKeyring, ServerKeyring

SERVER = "server"
HANDOUT = "handout"
ROLES = ("proxy", "org")
CERT_DAYS = 825
PUBLIC_SUFFIX = ".public.json"
PIN_FILE = "manifest.sha256"
SUPERNODE_KEY, SUPERNODE_PUB = "supernode.key", "supernode.pub"
# What counts as a private key when scanning a directory: these names, and any file whose first
# bytes carry a PEM/OpenSSH "PRIVATE KEY" header.
PRIVATE_NAMES = ("x25519.key", SUPERNODE_KEY, "superlink.key", "ckks_secret.ctx", "ca.key")
MAX_SCAN = 5000


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
    names = list(proxies) + list(orgs)
    if len(set(names)) != len(names):
        raise ConfigError(f"proxy and organization names must be distinct: {names}", "rename the duplicates")
    if len(proxies) < 1:
        raise ConfigError("at least one proxy is needed", "pass --proxies N (2 or more for secret-sharing)")
    for n in names:
        _check_name(n)


def _check_name(name: str) -> str:

    if name in (SERVER, HANDOUT):
        raise ConfigError(f"{name!r} is reserved for the operator's bundles", "rename that proxy or organization")
    try:
        return _check_id(name)
    except ValueError as exc:
        raise ConfigError(f"{name!r} cannot name a key bundle ({exc})", "use letters, digits, '.', '_' and '-'") from None


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FedveilError(f"{path} already holds keys", "choose another --out, or pass --force to replace them")


# ---- step 1: a party makes its own keys -----------------------------------------------------------
@dataclass(frozen=True)
class PartyPublic:
    """What a proxy or organization hands the operator: its public keys, nothing else."""

    role: str
    name: str
    supernode_public_key: bytes  # OpenSSH "ecdsa-sha2-nistp384 ..." line
    x25519_public_key: bytes | None  # proxies only

    def document(self) -> dict:
    
        doc = {"version": 1, "role": self.role, "name": self.name,
               "supernode_public_key": self.supernode_public_key.decode(),
               "supernode_sha256": sha256_hex(self.supernode_public_key)}
        if self.x25519_public_key is not None:
            doc["x25519_public_key"] = base64.b64encode(self.x25519_public_key).decode()
            doc["x25519_sha256"] = sha256_hex(self.x25519_public_key)
        return doc


def generate_party(out: str | Path, role: str, name: str, overwrite: bool = False) -> Path:
    """Make one party's private keys in `out` (mode 0600) and its public file; returns the public file.

    Run on the party's own host: the private keys never leave `out`.
    """

    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}", "use --role proxy or --role org (the operator runs `keys init`)")
    _check_name(name)
    out = Path(out)
    _refuse_existing(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    private, public = make_supernode_keypair()
    _write(out / SUPERNODE_KEY, private, True)
    _write(out / SUPERNODE_PUB, public, False)
    x25519 = secure_keys.write_proxy_keypair(out, name, overwrite=True) if role == "proxy" else None
    party = PartyPublic(role, name, public, x25519)
    path = out / f"{name}{PUBLIC_SUFFIX}"
    _write(path, (json.dumps(party.document(), indent=2) + "\n").encode(), False)
    return path


def read_public(path: str | Path) -> PartyPublic:
    """Parse and check a party's public file: role, name, a P-384 SSH key, a 32-byte X25519 key, fingerprints."""

    path = Path(path)
    fix = "ask that party for the NAME.public.json written by `fedveil keys gen`"
    try:
        doc = json.loads(path.read_text())
        role, name = doc["role"], doc["name"]
        ssh = doc["supernode_public_key"].encode()
        x25519 = base64.b64decode(doc["x25519_public_key"], validate=True) if "x25519_public_key" in doc else None
    except FileNotFoundError:
        raise ConfigError(f"public key file {path} does not exist", fix) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a fedveil public key file ({exc})", fix) from None
    if role not in ROLES:
        raise ConfigError(f"{path}: role {role!r} is not proxy or org", fix)
    _check_name(name)
    if "PRIVATE" in json.dumps(doc):
        raise SecurityError(f"{path} contains a private key", "hand over only NAME.public.json; generate new keys")
    try:
        key = serialization.load_ssh_public_key(ssh)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: the SuperNode key is not an OpenSSH public key ({exc})", fix) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise ConfigError(f"{path}: the SuperNode key must be EC P-384 (what Flower expects)", fix)
    if (role == "proxy") != (x25519 is not None) or (x25519 is not None and len(x25519) != 32):
        raise ConfigError(f"{path}: a proxy needs a 32-byte X25519 public key, an organization none", fix)
    for field_, value in (("supernode_sha256", ssh), ("x25519_sha256", x25519)):
        if value is not None and doc.get(field_) != sha256_hex(value):
            raise SecurityError(f"{path}: {field_} does not match the key it describes (the file was altered)", fix)
    return PartyPublic(role, name, ssh, x25519)


# ---- step 2: the operator builds the federation from public keys -----------------------------------
def _ckks_contexts(poly_degree: int) -> tuple[bytes, bytes]:
    from fedveil.secure.ckks import make_ckks_context

    return make_ckks_context(poly_degree, (60, 40, 40, 60) if poly_degree == 8192 else (60, 49))


def build_federation(out: str | Path, parties: Sequence[PartyPublic], hosts: Sequence[str] = (),
                     federation: str = "fedveil", ckks: bool = True, ckks_poly_degree: int = 8192,
                     overwrite: bool = False) -> str:
    """The operator's step: OUT/server and OUT/handout (module docstring) from public keys only.

    Returns the manifest's fingerprint, which every party checks out of band.
    """

    out = Path(out)
    proxies = [p for p in parties if p.role == "proxy"]
    _check_names([p.name for p in proxies], [p.name for p in parties if p.role == "org"])
    for where in (out / SERVER, out / HANDOUT):
        _refuse_existing(where, overwrite)
    server, handout = out / SERVER, out / HANDOUT
    ca_key, ca_cert = make_ca(federation)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    srv_key, srv_cert = make_server_cert(ca_key, ca_cert, hosts)
    del ca_key  # never written: a later certificate means a new ceremony
    _write(server / "ca.pem", ca_pem, False)
    _write(server / "superlink.pem", srv_cert.public_bytes(serialization.Encoding.PEM), False)
    _write(server / "superlink.key", _pem_key(srv_key), True)
    for party in parties:
        _write(server / "supernodes" / f"{party.name}.pub", party.supernode_public_key, False)
    extra = {"federation": federation, "ca_sha256": secure_keys.sha256_hex(ca_pem),
             "ckks_public_context_sha256": None}
    _write(handout / "ca.pem", ca_pem, False)
    if ckks:
        secret, public = _ckks_contexts(ckks_poly_degree)
        _write(server / "ckks_secret.ctx", secret, True)
        _write(handout / secure_keys.CKKS_PUBLIC, public, False)
        extra["ckks_public_context_sha256"] = secure_keys.sha256_hex(public)
    manifest = secure_keys.write_manifest(handout, {p.name: p.x25519_public_key for p in proxies}, ckks, extra)
    _write(server / secure_keys.MANIFEST, manifest.read_bytes(), False)
    return secure_keys.manifest_fingerprint(manifest)


# ---- step 3: a party checks and installs the handout ---------------------------------------------
def _own_public(party_dir: Path) -> PartyPublic:
    found = sorted(party_dir.glob(f"*{PUBLIC_SUFFIX}"))
    if len(found) != 1:
        raise ConfigError(f"{party_dir} holds {len(found)} *{PUBLIC_SUFFIX} files, expected this party's one",
                          "pass the --out directory of this party's `fedveil keys gen`")
    return read_public(found[0])


def install_handout(handout: str | Path, party_dir: str | Path, manifest_fingerprint: str) -> str:
    """Check the operator's handout against the fingerprint obtained out of band, then copy it in.

    Refuses a manifest that does not match the fingerprint, a CA or CKKS context that does not match
    the manifest, and, for a proxy, a manifest that lists a different key for it. Returns the fingerprint.
    """

    handout, party_dir = Path(handout), Path(party_dir)
    manifest = handout / secure_keys.MANIFEST
    fp = secure_keys.check_manifest_fingerprint(manifest, manifest_fingerprint)
    doc = secure_keys.manifest_document(manifest)
    fix = "ask the operator for the handout that matches the published fingerprint"
    ca = (handout / "ca.pem").read_bytes() if (handout / "ca.pem").exists() else b""
    if doc.get("ca_sha256") and secure_keys.sha256_hex(ca) != doc["ca_sha256"]:
        raise SecurityError(f"{handout / 'ca.pem'} does not match the manifest's ca_sha256", fix)
    ctx_path = handout / secure_keys.CKKS_PUBLIC
    if doc.get("ckks_public_context"):
        want = doc.get("ckks_public_context_sha256")
        if not ctx_path.exists() or (want and secure_keys.sha256_hex(ctx_path.read_bytes()) != want):
            raise SecurityError(f"{ctx_path} is missing or does not match the manifest", fix)
    me = _own_public(party_dir)
    check_custody(party_dir, me.role, me.name)
    if me.role == "proxy":
        listed = secure_keys.read_manifest(manifest).get(me.name)
        if listed != me.x25519_public_key:
            raise SecurityError(f"the manifest lists {'no' if listed is None else 'another'} X25519 key for proxy "
                                f"{me.name!r}: organizations would seal to a key this proxy does not hold", fix)
    _write(party_dir / "ca.pem", ca, False)
    _write(party_dir / secure_keys.MANIFEST, manifest.read_bytes(), False)
    if ctx_path.exists():
        _write(party_dir / secure_keys.CKKS_PUBLIC, ctx_path.read_bytes(), False)
    _write(party_dir / PIN_FILE, (fp + "\n").encode(), False)
    return fp


# ---- single host: the same ceremony in one process -------------------------------------------------
def init_federation_keys(out: str | Path, proxies: Sequence[str], orgs: Sequence[str], hosts: Sequence[str] = (),
                         federation: str = "fedveil", ckks: bool = True, ckks_poly_degree: int = 8192,
                         overwrite: bool = False) -> Path:
    """Single-host use (demo, tests): the ceremony's three steps with one directory per role under `out`.

    OUT/<party>/ from `generate_party` + `install_handout`, OUT/server/ and OUT/handout/ from
    `build_federation`; each node must be given only its own directory. Returns `out`.
    """
    out = Path(out)
    _check_names(proxies, orgs)
    _refuse_existing(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in (SERVER, HANDOUT, *proxies, *orgs):
            shutil.rmtree(out / name, ignore_errors=True)
    roles = [("proxy", p) for p in proxies] + [("org", o) for o in orgs]
    publics = [read_public(generate_party(out / name, role, name)) for role, name in roles]
    fp = build_federation(out, publics, hosts, federation, ckks, ckks_poly_degree)
    for _, name in roles:
        install_handout(out / HANDOUT, out / name, fp)
    return out


# ---- custody: no directory holds another party's private key ----------------------------------------
def _looks_private(path: Path) -> bool:
    if path.name in PRIVATE_NAMES:
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return b"PRIVATE KEY-----" in head


def _allowed_private(role: str, name: str) -> set[Path]:
    if role == SERVER:
        return {Path("superlink.key"), Path("ckks_secret.ctx")}
    allowed = {Path(SUPERNODE_KEY)}
    if role == "proxy":
        allowed.add(Path("proxies") / name / "x25519.key")
    return allowed


def foreign_private_keys(bundle: str | Path, role: str, name: str = "", within: Path = Path(".")) -> list[Path]:
    """Files under `bundle` that are private keys this party must not hold (relative paths).

    `within`: where the party's own files sit below `bundle` (e.g. "server" for the operator's --out).
    """
    bundle = Path(bundle)
    allowed = {within / p for p in _allowed_private(role, name)}
    found: list[Path] = []
    for count, path in enumerate(p for p in bundle.rglob("*") if p.is_file() and not p.is_symlink()):
        if count >= MAX_SCAN:
            raise ConfigError(f"{bundle} holds more than {MAX_SCAN} files; it is not a key bundle",
                              "pass the directory that holds only this party's keys")
        rel = path.relative_to(bundle)
        if rel not in allowed and _looks_private(path):
            found.append(rel)
    return sorted(found)


def check_custody(bundle: str | Path, role: str, name: str = "", within: Path = Path(".")) -> Path:
    """Refuse a key directory that holds any other party's private key; returns it resolved."""
    bundle = Path(bundle).resolve()
    foreign = foreign_private_keys(bundle, role, name, within)
    if foreign:
        who = "the server" if role == SERVER else f"{role} {name}"
        shown = ", ".join(str(p) for p in foreign[:6]) + (", ..." if len(foreign) > 6 else "")
        raise SecurityError(
            f"{bundle} holds private keys that are not {who}'s: {shown}. With another party's keys {who} could "
            "open what only that party may open",
            "give each party only its own directory (the server: OUT/server from `fedveil keys init`; a proxy or an "
            "organization: the --out of its own `fedveil keys gen`), and delete copies of other parties' keys")
    return bundle


def server_bundle_root(keys: str | Path) -> Path:
    """The server's bundle: `keys` itself, or `keys`/server when given the operator's --out."""
    root = Path(keys).resolve()
    if not (root / "superlink.pem").exists() and (root / SERVER).is_dir():
        return root / SERVER
    return root


def checked_server_bundle(keys: str | Path) -> Path:
    """What `fedveil server --keys` uses: the server bundle, after refusing any foreign private key under `keys`."""
    root = Path(keys).resolve()
    if not root.is_dir():
        raise ConfigError(f"the key directory {root} does not exist", "pass OUT/server from `fedveil keys init`")
    bundle = server_bundle_root(root)
    check_custody(root, SERVER, within=bundle.relative_to(root))
    if not (bundle / "superlink.pem").exists():
        raise ConfigError(f"{bundle} has no superlink.pem: it is not the server's bundle",
                          "pass OUT/server from the operator's `fedveil keys init`")
    return bundle


# ---- loading bundles into keyrings -------------------------------------------------------------
def _optional(path: Path) -> Path | None:
    return path if path.exists() else None


def load_client_keyring_dir(bundle: str | Path) -> ClientKeyring:
    """An organization's keyring; refuses foreign private keys and a manifest that does not match its pin."""

    bundle = check_custody(bundle, "org")
    pin = bundle / PIN_FILE
    return secure_keys.load_client_keyring(bundle / secure_keys.MANIFEST, _optional(bundle / secure_keys.CKKS_PUBLIC),
                                           pin.read_text().strip() if pin.exists() else None)


def load_proxy_keyring_dir(bundle: str | Path, proxy_id: str) -> ProxyKeyring:
    """A proxy's keyring, with its peers' public keys from the installed manifest (checked against its pin)."""

    bundle = check_custody(bundle, "proxy", proxy_id)
    manifest, pin = _optional(bundle / secure_keys.MANIFEST), bundle / PIN_FILE
    if manifest is not None and pin.exists():
        secure_keys.check_manifest_fingerprint(manifest, pin.read_text().strip())
    return secure_keys.load_proxy_keyring(bundle, proxy_id, _optional(bundle / secure_keys.CKKS_PUBLIC), manifest)


def load_server_keyring_dir(bundle: str | Path) -> ServerKeyring:

    bundle = check_custody(bundle, SERVER)
    return secure_keys.load_server_keyring(_optional(bundle / "ckks_secret.ctx"))


def check_node_bundle(keys: str | Path, role: str, name: str, manifest_fingerprint: str | None = None) -> None:
    """Start-up check for `fedveil proxy|client --keys`: no other party's private key, and the pinned manifest.

    `manifest_fingerprint` (`fedveil client --manifest-fingerprint`) pins the manifest on the command
    line; a pin left by `keys install` is checked too. Missing files are left to the caller's
    file check, which names them all.
    """

    bundle = Path(keys)
    if not bundle.is_dir():
        return
    check_custody(bundle, "org" if role == "client" else role, name)
    if role != "client":
        return
    manifest = bundle / secure_keys.MANIFEST
    if manifest_fingerprint:
        secure_keys.check_manifest_fingerprint(manifest, manifest_fingerprint)
    if (bundle / PIN_FILE).exists() and manifest.exists():
        secure_keys.check_manifest_fingerprint(manifest, (bundle / PIN_FILE).read_text().strip())


# ---- CLI -------------------------------------------------------------------------------------------
def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _cmd_gen(args: argparse.Namespace) -> int:
    public = generate_party(args.out, args.role, args.name, overwrite=args.force)
    party = read_public(public)
    doc = party.document()
    print(f"{args.role} {args.name}: private keys in {Path(args.out).resolve()} (mode 0600): keep them on this host")
    print(f"  SuperNode key sha256 {doc['supernode_sha256']}")
    if party.x25519_public_key is not None:
        print(f"  X25519 key    sha256 {doc['x25519_sha256']}")
    print(f"hand {public} (public keys only) to the federation operator, and read these fingerprints to them out of band")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:

    hosts = _split(args.hosts)
    out = Path(args.out)
    if args.public:
        if args.orgs or args.proxy_names or args.proxies is not None:
            raise ConfigError("--public cannot be combined with --orgs/--proxies/--proxy-names",
                              "use --public files (multi-host ceremony) or --orgs (single-host demo), not both")
        fp = build_federation(out, [read_public(p) for p in args.public], hosts, args.federation,
                              ckks=not args.no_ckks, ckks_poly_degree=args.ckks_poly_degree, overwrite=args.force)
        print(f"federation {args.federation}: built from {len(args.public)} public key files (no private key of any "
              "proxy or organization was seen)")
        print(f"  {(out / SERVER).resolve()}: TLS key, CKKS secret key, SuperNode registrations -> the server only "
              f"(`fedveil server --keys {out / SERVER}`)")
        print(f"  {(out / HANDOUT).resolve()}: ca.pem, manifest.json, CKKS public context -> every proxy and organization")
        print(f"manifest fingerprint (sha256): {fp}")
        print("publish it out of band (phone, signed mail); each party installs with "
              f"`fedveil keys install --bundle handout --out DIR --manifest-fingerprint {fp}`")
        return 0
    orgs = _split(args.orgs)
    if not orgs:
        raise ConfigError("`keys init` needs --public files (multi-host) or --orgs (single-host)",
                          "run `fedveil keys gen` on each party's host and pass --public NAME.public.json, or for a "
                          "demo on one machine pass --orgs hospital-a,hospital-b")
    proxies = _split(args.proxy_names) or [f"proxy-{i + 1}" for i in range(2 if args.proxies is None else args.proxies)]
    init_federation_keys(out, proxies, orgs, hosts, federation=args.federation, ckks=not args.no_ckks,
                         ckks_poly_degree=args.ckks_poly_degree, overwrite=args.force)
    print(f"SINGLE-HOST USE ONLY: every party's private keys were made on this machine. Across hosts, each party "
          f"runs `fedveil keys gen` and the operator `fedveil keys init --public ...` (README).")
    print(f"provisioned {len(proxies)} proxies and {len(orgs)} organizations in {out}, one directory per role:")
    print(f"  {out / SERVER}: SuperLink TLS, CKKS secret key, SuperNode public keys -> the server only")
    for p in proxies:
        print(f"  {out / p}: proxy {p}'s X25519 private key and SuperNode key -> that proxy only")
    for o in orgs:
        print(f"  {out / o}: manifest of proxy public keys and SuperNode key -> organization {o} only")
    print(f"manifest fingerprint (sha256): {secure_keys.manifest_fingerprint(out / HANDOUT / secure_keys.MANIFEST)}")
    return 0


def _cmd_fingerprint(args: argparse.Namespace) -> int:

    path = Path(args.file)
    if not path.is_file():
        raise ConfigError(f"{path} is not a file", "pass manifest.json or a NAME.public.json")
    if path.name.endswith(PUBLIC_SUFFIX):
        doc = read_public(path).document()
        print(f"{doc['role']} {doc['name']}: SuperNode key sha256 {doc['supernode_sha256']}"
              + (f", X25519 key sha256 {doc['x25519_sha256']}" if "x25519_sha256" in doc else ""))
        return 0
    if path.name == secure_keys.MANIFEST:
        secure_keys.read_manifest(path)
    print(secure_keys.sha256_hex(path.read_bytes()))
    return 0


def _cmd_install(args: argparse.Namespace) -> int:
    fp = install_handout(args.bundle, args.out, args.manifest_fingerprint)
    me = _own_public(Path(args.out))
    print(f"{me.role} {me.name}: installed ca.pem, manifest.json and the CKKS public context in {Path(args.out).resolve()}; "
          f"manifest {fp} pinned in {PIN_FILE}")
    return 0


def add_keys_parser(sub) -> None:
    keys = sub.add_parser("keys", help="key ceremony: per-party keys, the operator's bundle, fingerprints")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)

    gen = keys_sub.add_parser("gen", help="on a proxy's or organization's own host: make its private keys")
    gen.add_argument("--role", required=True, choices=ROLES)
    gen.add_argument("--name", required=True, help="proxy name (as in proxies.names) or organization name")
    gen.add_argument("--out", required=True, help="this party's key directory (private: stays on this host)")
    gen.add_argument("--force", action="store_true", help="replace existing keys in --out")
    gen.set_defaults(func=_cmd_gen)

    init = keys_sub.add_parser("init", help="operator: build TLS, registrations and the manifest from public keys "
                                            "(or, with --orgs, every role's keys on one machine for a demo)")
    init.add_argument("--out", required=True, help="directory for the bundles")
    init.add_argument("--public", action="append", help="a party's NAME.public.json from `keys gen` (repeat)")
    init.add_argument("--proxies", type=int, help="single-host: number of proxies (named proxy-1..N, default 2)")
    init.add_argument("--proxy-names", help="single-host: comma-separated proxy names (instead of --proxies)")
    init.add_argument("--orgs", help="single-host: comma-separated organization names")
    init.add_argument("--hosts", help="extra SuperLink host names or IPs for the TLS certificate")
    init.add_argument("--federation", default="fedveil", help="federation name (in the CA and the manifest)")
    init.add_argument("--ckks-poly-degree", type=int, choices=(4096, 8192), default=8192)
    init.add_argument("--no-ckks", action="store_true", help="skip the CKKS context (secret-sharing only)")
    init.add_argument("--force", action="store_true", help="replace existing keys in --out")
    init.set_defaults(func=_cmd_init)

    fp = keys_sub.add_parser("fingerprint", help="print a manifest's SHA-256 (or a public file's key fingerprints)")
    fp.add_argument("file")
    fp.set_defaults(func=_cmd_fingerprint)

    inst = keys_sub.add_parser("install", help="on a party's host: check the operator's handout and install it")
    inst.add_argument("--bundle", required=True, help="the operator's handout directory")
    inst.add_argument("--out", required=True, help="this party's key directory (from `keys gen`)")
    inst.add_argument("--manifest-fingerprint", required=True,
                      help="the manifest fingerprint the operator told you out of band")
    inst.set_defaults(func=_cmd_install)
