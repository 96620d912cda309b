"""Key material on disk: proxy X25519 keypairs, the CKKS contexts and the client manifest.

Directory layout (``KEYDIR``, e.g. what `fedveil keys init` writes)::

    KEYDIR/
      manifest.json                    # public: {"version": 1, "proxies": {id: {"public_key": b64, "fingerprint": hex}},
                                       #          "ckks_public_context": "ckks/public.ctx" | null}
      proxies/<proxy_id>/x25519.key    # 32 raw bytes, mode 0600 -> that proxy only
      proxies/<proxy_id>/x25519.pub    # 32 raw bytes
      ckks/public.ctx                  # TenSEAL context without secret key -> clients and proxies
      server/ckks_secret.ctx           # TenSEAL context with secret key, mode 0600 -> server only

Clients get ``manifest.json`` and ``ckks/public.ctx``; each proxy gets its own ``proxies/<id>/``
plus ``ckks/public.ctx``; the server gets ``server/ckks_secret.ctx``. Loading a private file that
is readable by group or others raises `SecurityError` (like ssh does).

Key custody (see `fedveil.platform.provision`): each proxy creates its own X25519 key on its own
host; the operator builds the manifest from public keys only. The manifest may also record the
SHA-256 of the CA certificate and of the CKKS public context, so that one fingerprint, checked
out of band (`manifest_fingerprint`, the SHA-256 of the file, same as `sha256sum`), authenticates
everything an organization receives; `load_client_keyring` refuses a manifest that does not
match a pinned fingerprint, and a CKKS public context that does not match the manifest.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Iterable, Sequence

from fedveil.secure.errors import SecurityError
from fedveil.secure.envelope import generate_x25519_keypair, public_key_from_private
from fedveil.secure.modes import ClientKeyring, ProxyKeyring, ServerKeyring

MANIFEST = "manifest.json"
CKKS_PUBLIC = Path("ckks") / "public.ctx"
CKKS_SECRET = Path("server") / "ckks_secret.ctx"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FIX = "run `fedveil keys init` to provision keys"


def _check_id(proxy_id: str) -> str:
    if not _ID_RE.match(proxy_id or ""):
        raise ValueError(f"invalid proxy id {proxy_id!r}: use letters, digits, '.', '_' or '-' (max 64)")
    return proxy_id


def fingerprint(public_key: bytes) -> str:
    """Short SHA-256 fingerprint of a public key, for out-of-band comparison."""
    return hashlib.sha256(public_key).hexdigest()[:32]


def _write(path: Path, data: bytes, private: bool, overwrite: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; refusing to overwrite key material (pass overwrite=True)")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600 if private else 0o644)
    os.replace(tmp, path)


def _read_private(path: Path) -> bytes:
    path = Path(path)
    if not path.exists():
        raise SecurityError(f"private key file {path} does not exist.", FIX)
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        raise SecurityError(
            f"private key file {path} is accessible by other users (mode {oct(mode)}).", f"run `chmod 600 {path}`"
        )
    return path.read_bytes()


def write_proxy_keypair(key_dir: str | os.PathLike, proxy_id: str, overwrite: bool = False) -> bytes:
    """Generate a proxy X25519 keypair under KEYDIR/proxies/<proxy_id>/; return the raw public key."""
    _check_id(proxy_id)
    sk, pk = generate_x25519_keypair()
    base = Path(key_dir) / "proxies" / proxy_id
    _write(base / "x25519.key", sk, True, overwrite)
    _write(base / "x25519.pub", pk, False, overwrite)
    return pk


def load_proxy_private_key(key_dir: str | os.PathLike, proxy_id: str) -> bytes:
    """Read and sanity-check a proxy's private key (must be 32 bytes, mode 0600)."""
    sk = _read_private(Path(key_dir) / "proxies" / _check_id(proxy_id) / "x25519.key")
    if len(sk) != 32:
        raise SecurityError(f"proxy {proxy_id!r} private key is {len(sk)} bytes, expected 32.", FIX)
    return sk


def write_ckks_context(
    key_dir: str | os.PathLike,
    poly_degree: int = 8192,
    coeff_bits: Sequence[int] = (60, 40, 40, 60),
    scale_bits: int = 40,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Generate a CKKS context; write KEYDIR/server/ckks_secret.ctx (0600) and KEYDIR/ckks/public.ctx."""
    from fedveil.secure.ckks import make_ckks_context  # lazy: TenSEAL import is heavy

    secret, public = make_ckks_context(poly_degree, list(coeff_bits), scale_bits)
    sp, pp = Path(key_dir) / CKKS_SECRET, Path(key_dir) / CKKS_PUBLIC
    _write(sp, secret, True, overwrite)
    _write(pp, public, False, overwrite)
    return sp, pp


def write_manifest(key_dir: str | os.PathLike, proxy_public_keys: dict[str, bytes], ckks_public: bool = True,
                   extra: dict | None = None) -> Path:
    """Write KEYDIR/manifest.json with every proxy's public key (what clients receive out of band).

    `extra` adds fields such as "federation", "ca_sha256" and "ckks_public_context_sha256" (version 2).
    """
    doc = {
        "version": 2 if extra else 1,
        "proxies": {
            pid: {"public_key": base64.b64encode(pk).decode(), "fingerprint": fingerprint(pk)}
            for pid, pk in sorted(proxy_public_keys.items())
        },
        "ckks_public_context": str(CKKS_PUBLIC) if ckks_public else None,
        **(extra or {}),
    }
    path = Path(key_dir) / MANIFEST
    _write(path, json.dumps(doc, indent=2).encode(), False, True)
    return path


def init_keys(
    key_dir: str | os.PathLike,
    proxy_ids: Iterable[str],
    ckks: bool = True,
    poly_degree: int = 8192,
    coeff_bits: Sequence[int] = (60, 40, 40, 60),
    scale_bits: int = 40,
    overwrite: bool = False,
) -> Path:
    """Provision everything: proxy keypairs, optional CKKS contexts and the manifest; return the manifest path."""
    pks = {pid: write_proxy_keypair(key_dir, pid, overwrite) for pid in proxy_ids}
    if ckks:
        write_ckks_context(key_dir, poly_degree, coeff_bits, scale_bits, overwrite)
    return write_manifest(key_dir, pks, ckks)


def sha256_hex(data: bytes) -> str:
    """Full SHA-256 of some bytes, as hex: what `sha256sum` prints, for out-of-band checks."""
    return hashlib.sha256(data).hexdigest()


def manifest_fingerprint(manifest_path: str | os.PathLike) -> str:
    """The manifest's fingerprint: SHA-256 of the file's bytes (equal to `sha256sum manifest.json`)."""
    path = Path(manifest_path)
    if not path.exists():
        raise SecurityError(f"key manifest {path} does not exist.", FIX)
    return sha256_hex(path.read_bytes())


def check_manifest_fingerprint(manifest_path: str | os.PathLike, expected: str) -> str:
    """Refuse a manifest whose fingerprint is not the one checked out of band; returns the fingerprint."""
    got = manifest_fingerprint(manifest_path)
    want = (expected or "").strip().lower().replace(":", "").replace(" ", "")
    if got != want:
        raise SecurityError(
            f"key manifest {manifest_path} has fingerprint {got}, not the pinned {want or '(empty)'}: it was changed "
            "after the operator published it, or the fingerprint was mistyped.",
            "compare `fedveil keys fingerprint manifest.json` with the operator by phone or in person, and use the "
            "manifest the operator published; never take proxy keys from an unchecked manifest")
    return got


def manifest_document(manifest_path: str | os.PathLike) -> dict:
    """The parsed manifest (validated by `read_manifest`)."""
    read_manifest(manifest_path)
    return json.loads(Path(manifest_path).read_text())


def read_manifest(manifest_path: str | os.PathLike) -> dict[str, bytes]:
    """{proxy_id: raw public key} from a manifest; rejects malformed entries."""
    path = Path(manifest_path)
    if not path.exists():
        raise SecurityError(f"key manifest {path} does not exist.", FIX)
    try:
        doc = json.loads(path.read_text())
        keys = {pid: base64.b64decode(e["public_key"], validate=True) for pid, e in doc["proxies"].items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise SecurityError(f"key manifest {path} is malformed ({exc}).", FIX) from None
    for pid, pk in keys.items():
        _check_id(pid)
        if len(pk) != 32:
            raise SecurityError(f"manifest key for proxy {pid!r} is {len(pk)} bytes, expected 32.", FIX)
    return keys


def load_client_keyring(manifest_path: str | os.PathLike, ckks_public_path: str | os.PathLike | None = None,
                        pinned_fingerprint: str | None = None) -> ClientKeyring:
    """What a client needs: proxies' public keys from the manifest and (optionally) the CKKS public context.

    With `pinned_fingerprint` the manifest must match it; a CKKS public context must match the
    SHA-256 the manifest records for it (so the pin covers the context too).
    """
    if pinned_fingerprint is not None:
        check_manifest_fingerprint(manifest_path, pinned_fingerprint)
    keys = read_manifest(manifest_path)
    ctx = Path(ckks_public_path).read_bytes() if ckks_public_path else None
    want = json.loads(Path(manifest_path).read_text()).get("ckks_public_context_sha256")
    if ctx is not None and want and sha256_hex(ctx) != want:
        raise SecurityError(f"CKKS public context {ckks_public_path} does not match the manifest's SHA-256 {want}.",
                            "install the context from the operator's handout again (`fedveil keys install`)")
    return ClientKeyring(proxy_public_keys=keys, ckks_public_context=ctx)


def load_proxy_keyring(
    key_dir: str | os.PathLike, proxy_id: str, ckks_public_path: str | os.PathLike | None = None,
    manifest_path: str | os.PathLike | None = None,
) -> ProxyKeyring:
    """What a proxy needs: its private key (checked against its .pub if present), the CKKS public context,
    and, from the manifest, its peers' public keys (the pairwise keys of the quorum commit). A manifest
    that lists another key for this proxy is refused: peers would derive keys it cannot."""
    sk = load_proxy_private_key(key_dir, proxy_id)
    own = public_key_from_private(sk)
    pub = Path(key_dir) / "proxies" / proxy_id / "x25519.pub"
    if pub.exists() and pub.read_bytes() != own:
        raise SecurityError(f"proxy {proxy_id!r}: x25519.key and x25519.pub do not match.", FIX)
    peers = read_manifest(manifest_path) if manifest_path else {}
    if peers.get(proxy_id, own) != own:
        raise SecurityError(f"the manifest {manifest_path} lists another X25519 key for proxy {proxy_id!r}.",
                            "install the operator's handout again (`fedveil keys install`)")
    ctx = Path(ckks_public_path).read_bytes() if ckks_public_path else None
    return ProxyKeyring(proxy_id=proxy_id, private_key=sk, ckks_public_context=ctx,
                        peer_public_keys={p: k for p, k in peers.items() if p != proxy_id})


def load_server_keyring(ckks_secret_path: str | os.PathLike | None = None) -> ServerKeyring:
    """What the server needs: the CKKS secret context (None for secret-sharing only federations)."""
    return ServerKeyring(ckks_secret_context=_read_private(Path(ckks_secret_path)) if ckks_secret_path else None)
