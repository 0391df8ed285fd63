"""Developer tools run from the repository root (`python -m devtools.NAME`); not part of the wheel."""
