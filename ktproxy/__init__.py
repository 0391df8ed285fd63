"""ktproxy: a root-free successor to kt-connect's ktctl, the client half (`ktctl`). Data flows one way:
cli -> commands -> capabilities (shadow, exchange, mesh, preview, forward, cleanup) -> cluster access
and the SSH tunnel -> the local servers (proxy, dns, pac)."""

__version__ = "0.1.0"
