"""The one SSH session to a shadow pod: opening it, keeping it alive and rebuilding it (supervisor),
channels out, and remote forwards back to the laptop."""
