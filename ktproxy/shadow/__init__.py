"""The shadow pod and its life: the pod and the Secret it runs from, readiness, heartbeat,
replacement, and SSH to it over the port-forward. Every command that needs a tunnel starts here."""
