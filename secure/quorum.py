"""Proxy quorum certificates: proxies agree on an aggregate's client set without trusting the server.

Why: in `replicated-sharing` every share is held by k-1 >= 2 proxies. A server that asks two holders
of one share to combine different client sets (S, and S without a victim) and colludes with the
proxy that lacks that share isolates the victim's update. So a proxy releases share sums only for
a `Statement` that a quorum of proxies committed to, each at most once:

* commit: a proxy commits durably to one statement per (run, aggregate task), and each client update
  (run, train task, client) to at most one aggregate; then it returns, for every peer b, the tag
  HMAC-SHA256(K_ab, issuer || recipient || SHA-256(statement)) (`commit_tags`).
* release: a proxy combines only the statement it committed to, and only while it holds valid tags
  over that statement from at least q-1 distinct peers (`check_quorum`), q = `quorum_size(k)`.

Safety: two quorums of the same k proxies share >= 2q - k >= 2 of them; at most one proxy colludes
with the server, so an honest proxy is in both, and it commits once. Two different statements that
hold the same client update can therefore never both reach a quorum, whatever the server sends
and whatever tags the colluding proxy makes.

The statement names the proxy list the shares were made over and each member's train task and
staleness (the weight the proxy derives from it): sets that differ only in a weight isolate a
client just as well. K_ab = HKDF-SHA256(X25519(a_priv, b_pub)) with a label and both names, from
keys the proxies already hold (own private key, peers' public keys from the pinned manifest). A
tag names its issuer and recipient, so the server cannot reflect a proxy's own tag back to it as
its peer's. Pure functions on bytes; every primitive comes from `cryptography`.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedveil.secure.envelope import _load_private, _load_public
from fedveil.secure.errors import SecurityError
from fedveil.secure.modes import ProxyKeyring

PAIR_LABEL = b"fedveil/quorum/pair-key/v1/x25519-hkdf-sha256"
TAG_LABEL = b"fedveil/quorum/tag/v1/hmac-sha256"
STATEMENT_VERSION = 1
TAG_BYTES = 32
_PEER_FIX = ("give every proxy the manifest listing all proxies (`fedveil keys install`), and use the same proxy "
             "list everywhere")

Member = tuple[str, str, "int | None"]  # (client id, train task its update answers, staleness or None)


@dataclass(frozen=True)
class Statement:
    """What a proxy commits to: one aggregate's proxy list and members, canonical and comparable."""

    run_id: str
    task_id: str
    proxies: tuple[str, ...]
    members: tuple[Member, ...]

    @property
    def clients(self) -> list[str]:
        return [cid for cid, _, _ in self.members]

    @property
    def updates(self) -> list[tuple[str, str]]:
        """(train task, client) of every member: the identity of one client update."""
        return [(task, cid) for cid, task, _ in self.members]

    def encode(self) -> bytes:
        """Canonical bytes (sorted, fixed separators): equal statements encode alike, different ones differ."""
        doc = {"v": STATEMENT_VERSION, "run": self.run_id, "task": self.task_id, "proxies": list(self.proxies),
               "members": [list(m) for m in self.members]}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    def digest(self) -> bytes:
        return hashlib.sha256(self.encode()).digest()

    @classmethod
    def decode(cls, data: bytes) -> "Statement":
        """The statement `encode` wrote (a proxy's own commit record); ValueError if it is not one."""
        try:
            doc = json.loads(data)
            if doc["v"] != STATEMENT_VERSION:
                raise ValueError(f"statement version {doc['v']}")
            return statement(doc["run"], doc["task"], doc["proxies"], [m[0] for m in doc["members"]],
                             {m[0]: m[1] for m in doc["members"]},
                             {m[0]: m[2] for m in doc["members"] if m[2] is not None})
        except (KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ValueError(f"malformed quorum statement: {exc}") from None


def statement(run_id: str, task_id: str, proxies: Sequence[str], clients: Sequence[str],
              task_ids: Mapping[str, str] | None = None, staleness: Mapping[str, object] | None = None) -> Statement:
    """The statement for an aggregate request: sorted proxies, and per client its train task and staleness.

    Raises ValueError for a proxy list with duplicates or a staleness that is not an integer."""
    ps = tuple(sorted(str(p) for p in proxies))
    if len(set(ps)) != len(ps) or len(ps) < 2:
        raise ValueError(f"a quorum statement needs >= 2 distinct proxies, got {list(proxies)}")
    members = []
    for cid in sorted(set(str(c) for c in clients)):
        s = (staleness or {}).get(cid)
        if s is not None and (isinstance(s, bool) or not isinstance(s, int)):
            raise ValueError(f"staleness of {cid} is {s!r}, not an integer")
        members.append((cid, str((task_ids or {}).get(cid, task_id)), s))
    return Statement(str(run_id), str(task_id), ps, tuple(members))


def quorum_size(k: int) -> int:
    """The smallest q with 2q - k >= 2: any two quorums of k proxies share at least two proxies.

    k=3 -> 3 (no proxy may be missing), k=4 -> 3 (one may), k=5 -> 4, k=6 -> 4, k=7 -> 5."""
    if k < 2:
        raise ValueError(f"a quorum needs at least 2 proxies, got {k}")
    return (k + 3) // 2


def pair_key(keys: ProxyKeyring, peer: str) -> bytes:
    """K_ab: the key this proxy shares with `peer`, from its own private key and the peer's provisioned public key."""
    if keys.private_key is None:
        raise SecurityError(f"proxy {keys.proxy_id!r} has no X25519 private key loaded, so it cannot tag or check "
                            "a quorum.", "start the proxy with its own key bundle (`--keys`)")
    public = keys.peer_public_keys.get(peer)
    if public is None or peer == keys.proxy_id:
        raise SecurityError(f"proxy {keys.proxy_id!r} has no provisioned public key for peer {peer!r}.", _PEER_FIX)
    try:
        shared = _load_private(keys.private_key).exchange(_load_public(public))
    except ValueError as exc:  # a low-order public key: the manifest was not made by `fedveil keys`
        raise SecurityError(f"the public key of peer {peer!r} is invalid ({exc}).", _PEER_FIX) from None
    info = PAIR_LABEL + _lp(*sorted((keys.proxy_id, peer)))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _lp(*fields: str) -> bytes:
    """Length-prefixed fields: no two different tuples encode alike."""
    out = []
    for f in fields:
        data = f.encode("utf-8")
        out.append(struct.pack(">I", len(data)) + data)
    return b"".join(out)


def _mac(key: bytes, issuer: str, recipient: str, st: Statement) -> hmac.HMAC:
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(TAG_LABEL + _lp(issuer, recipient) + st.digest())
    return mac


def _peers(keys: ProxyKeyring, st: Statement) -> list[str]:
    if keys.proxy_id not in st.proxies:
        raise SecurityError(f"the statement's proxy list {list(st.proxies)} does not include {keys.proxy_id!r}.",
                            "the server must send each proxy the list its clients shared over")
    return [p for p in st.proxies if p != keys.proxy_id]


def tag(keys: ProxyKeyring, recipient: str, st: Statement) -> bytes:
    """The tag from this proxy to `recipient` over `st` (what `commit_tags` hands out after the commit)."""
    return _mac(pair_key(keys, recipient), keys.proxy_id, recipient, st).finalize()


def commit_tags(keys: ProxyKeyring, st: Statement) -> dict[str, bytes]:
    """{peer: tag} that tells each peer this proxy committed to `st`. Raises SecurityError if a peer has no key."""
    return {peer: tag(keys, peer, st) for peer in _peers(keys, st)}


def check_quorum(keys: ProxyKeyring, st: Statement, tags: Mapping[str, bytes]) -> list[str]:
    """The peers whose tag over `st` to this proxy verifies; SecurityError unless at least q-1 do.

    A tag from a name outside the statement's proxy list, from a proxy without a provisioned key, over
    another statement, or addressed to another proxy does not count (each is named in the error)."""
    need = quorum_size(len(st.proxies)) - 1
    peers = set(_peers(keys, st))
    valid, refused = [], {}
    for issuer, tag in sorted(tags.items()):
        if issuer not in peers:
            refused[issuer] = "not a peer in this aggregate's proxy list"
            continue
        try:
            key = pair_key(keys, issuer)
            _mac(key, issuer, keys.proxy_id, st).verify(bytes(tag))
        except SecurityError as exc:
            refused[issuer] = exc.problem
            continue
        except (InvalidSignature, TypeError):
            refused[issuer] = "tag does not verify over this statement"
            continue
        valid.append(issuer)
    if len(valid) < need:
        raise SecurityError(
            f"proxy {keys.proxy_id!r} holds valid commit tags from {len(valid)} peer(s) {valid}, fewer than the "
            f"{need} a quorum of {need + 1} of {len(st.proxies)} proxies needs for task {st.task_id!r}"
            + (f" (refused: {refused})" if refused else "")
            + "; it releases nothing, since another set of clients could have been committed elsewhere.",
            "let every live proxy answer the commit request for this exact client set; with fewer than a quorum "
            "alive the aggregate cannot be released")
    return valid
