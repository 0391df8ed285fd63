"""Kubernetes access and nothing else: client and kubeconfig, one-line errors, the port-forward, discovery,
object names and labels, heartbeats, waiting helpers. It knows no command and imports no capability."""
