"""Per-session key material: fresh keys every session, in the formats the shadow pod reads."""

from __future__ import annotations

import base64
import struct

import asyncssh

from ktproxy.tunnel.keys import generate_session_keys


def _blob(openssh_line: str) -> bytes:
    return base64.b64decode(openssh_line.split()[1])


def test_keys_are_fresh_per_session():
    a, b = generate_session_keys(), generate_session_keys()
    blobs = {_blob(a.authorized_keys), _blob(b.authorized_keys),
             _blob(a.host_key_public.export_public_key().decode()),
             _blob(b.host_key_public.export_public_key().decode())}
    assert len(blobs) == 4  # no reuse across sessions, and the client key is not the host key


def test_authorized_keys_is_an_openssh_public_key():
    keys = generate_session_keys()
    line = keys.authorized_keys.strip()
    assert "\n" not in line
    algo, b64 = line.split()[:2]
    assert algo == "ssh-ed25519"
    blob = base64.b64decode(b64, validate=True)
    (n,) = struct.unpack("!I", blob[:4])
    assert blob[4:4 + n] == b"ssh-ed25519"  # the wire blob names its own algorithm
    # the shadow's asyncssh accepts it as an authorized_keys file and matches the client's key
    authorized = asyncssh.import_authorized_keys(keys.authorized_keys)
    assert authorized.validate(keys.client_key.convert_to_public(), "client", "127.0.0.1", None) is not None
    other = generate_session_keys().client_key.convert_to_public()
    assert authorized.validate(other, "client", "127.0.0.1", None) is None


def test_authorized_keys_holds_no_private_material():
    keys = generate_session_keys()
    assert "PRIVATE" not in keys.authorized_keys
    assert keys.client_key.export_private_key().decode() not in keys.authorized_keys


def test_host_private_key_round_trips():
    keys = generate_session_keys()
    pem = keys.host_key_private
    assert pem.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    imported = asyncssh.import_private_key(pem)
    assert imported.export_public_key() == keys.host_key.export_public_key()
    assert imported.export_public_key() == keys.host_key_public.export_public_key()
    # what the shadow signs with, the client's pinned public key verifies
    sig = imported.sign(b"session-id", b"ssh-ed25519")
    assert keys.host_key_public.verify(b"session-id", sig)
    assert not generate_session_keys().host_key_public.verify(b"session-id", sig)


def test_host_key_public_is_public_only():
    keys = generate_session_keys()
    pub = keys.host_key_public
    assert isinstance(pub, asyncssh.SSHKey)
    assert b"PRIVATE" not in pub.export_public_key()
