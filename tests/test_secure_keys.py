import json
import os
import stat

import pytest

from fedveil.platform.errors import SecurityError
from fedveil.secure import keys
from fedveil.secure.envelope import open_envelope, seal
from fedveil.secure.modes import Binding


def test_proxy_keypair_layout_and_roundtrip(tmp_path):
    pk = keys.write_proxy_keypair(tmp_path, "proxy-a")
    kf = tmp_path / "proxies" / "proxy-a" / "x25519.key"
    assert stat.S_IMODE(kf.stat().st_mode) == 0o600
    assert (tmp_path / "proxies" / "proxy-a" / "x25519.pub").read_bytes() == pk
    manifest = keys.write_manifest(tmp_path, {"proxy-a": pk}, ckks_public=False)
    ck = keys.load_client_keyring(manifest)
    pkr = keys.load_proxy_keyring(tmp_path, "proxy-a")
    b = Binding("r", "t", "c", "proxy-a", "none", 1)
    assert open_envelope(seal(b"x", ck.proxy_public_keys["proxy-a"], b), pkr.private_key, b) == b"x"
    doc = json.loads(manifest.read_text())
    assert doc["proxies"]["proxy-a"]["fingerprint"] == keys.fingerprint(pk)


def test_refuses_overwrite_and_bad_ids(tmp_path):
    keys.write_proxy_keypair(tmp_path, "p1")
    with pytest.raises(FileExistsError):
        keys.write_proxy_keypair(tmp_path, "p1")
    with pytest.raises(ValueError):
        keys.write_proxy_keypair(tmp_path, "../evil")


def test_world_readable_private_key_refused(tmp_path):
    keys.write_proxy_keypair(tmp_path, "p1")
    os.chmod(tmp_path / "proxies" / "p1" / "x25519.key", 0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        keys.load_proxy_keyring(tmp_path, "p1")


def test_missing_files_say_keys_init(tmp_path):
    with pytest.raises(SecurityError, match="fedveil keys init"):
        keys.load_proxy_keyring(tmp_path, "p1")
    with pytest.raises(SecurityError, match="fedveil keys init"):
        keys.load_client_keyring(tmp_path / "manifest.json")


def test_init_keys_with_ckks(tmp_path):
    manifest = keys.init_keys(tmp_path, ["p1", "p2"], ckks=True, poly_degree=4096, coeff_bits=(60, 49))
    ck = keys.load_client_keyring(manifest, tmp_path / keys.CKKS_PUBLIC)
    assert set(ck.proxy_public_keys) == {"p1", "p2"} and ck.ckks_public_context
    sk = keys.load_server_keyring(tmp_path / keys.CKKS_SECRET)
    assert stat.S_IMODE((tmp_path / keys.CKKS_SECRET).stat().st_mode) == 0o600
    assert len(sk.ckks_secret_context) > len(ck.ckks_public_context)


def test_manifest_fingerprint_is_sha256_of_the_file_and_pinning_refuses_a_change(tmp_path):
    import hashlib

    pk = keys.write_proxy_keypair(tmp_path, "p1")
    manifest = keys.write_manifest(tmp_path, {"p1": pk}, ckks_public=False, extra={"federation": "t"})
    fp = keys.manifest_fingerprint(manifest)
    assert fp == hashlib.sha256(manifest.read_bytes()).hexdigest()  # what `sha256sum manifest.json` prints
    assert json.loads(manifest.read_text())["version"] == 2
    assert keys.load_client_keyring(manifest, pinned_fingerprint=fp.upper()).proxy_public_keys == {"p1": pk}
    manifest.write_text(manifest.read_text().replace('"t"', '"u"'))
    with pytest.raises(SecurityError, match="not the pinned"):
        keys.load_client_keyring(manifest, pinned_fingerprint=fp)


def test_ckks_public_context_must_match_the_manifest(tmp_path):
    ctx = tmp_path / "public.ctx"
    ctx.write_bytes(b"the operator's public context")
    pk = keys.write_proxy_keypair(tmp_path, "p1")
    manifest = keys.write_manifest(tmp_path, {"p1": pk}, extra={"ckks_public_context_sha256": keys.sha256_hex(ctx.read_bytes())})
    assert keys.load_client_keyring(manifest, ctx).ckks_public_context == ctx.read_bytes()
    ctx.write_bytes(b"a context whose secret key someone else holds")
    with pytest.raises(SecurityError, match="does not match the manifest"):
        keys.load_client_keyring(manifest, ctx)
