"""Code both ends of the tunnel share: ktctl (ktproxy/) and the in-cluster programs (shadow_image/).

Kept small and dependency-light on purpose: the shadow image copies this package beside shadow_image/.
"""
