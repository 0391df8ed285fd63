"""Errors a user can act on: reported as one line, with a non-zero exit."""


class KtError(Exception):
    exit_code = 1


class UsageError(KtError):
    exit_code = 2
