"""`forward`'s side of the cluster: what a TARGET names and how to dial it again when pods come and go."""
