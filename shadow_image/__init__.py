"""The in-cluster side of ktproxy: the shadow SSH server (and, later, the mesh header router)."""
