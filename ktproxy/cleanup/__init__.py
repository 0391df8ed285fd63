"""Undoing what killed or crashed runs left: the stale sweep with every capability's hook (sweep), and
`recover SVC` for a Service an exchange or mesh changed (recover)."""
