"""Per-session key material.

The client makes both key pairs: its own (the private half never leaves this process) and the shadow's
host key, so the shadow's identity is known before the first byte arrives and can be pinned.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncssh

ALGORITHM = "ssh-ed25519"


@dataclass(frozen=True)
class SessionKeys:
    client_key: asyncssh.SSHKey
    host_key: asyncssh.SSHKey

    @property
    def authorized_keys(self) -> str:
        """What the shadow accepts: the client's public key in OpenSSH format."""
        return self.client_key.export_public_key().decode()

    @property
    def host_key_private(self) -> str:
        """The shadow's host private key (OpenSSH PEM); it goes into the cluster's Secret."""
        return self.host_key.export_private_key().decode()

    @property
    def host_key_public(self) -> asyncssh.SSHKey:
        return asyncssh.import_public_key(self.host_key.export_public_key())


def generate_session_keys() -> SessionKeys:
    return SessionKeys(asyncssh.generate_private_key(ALGORITHM), asyncssh.generate_private_key(ALGORITHM))
