"""The mesh router: the pod `<svc>-kt-router` that takes a meshed Service's selector and sends each HTTP
request (or HTTP/2 stream) to the developer whose header it carries, everything else to the original pods.

It needs no API credentials: its routes come from its own pod's annotations through a downward API
volume (table.py), which the kubelet rewrites within about a second of an annotation change.
"""
