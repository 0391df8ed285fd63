"""`ktctl` command line: global flags, one sub-command per module in ktproxy.commands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ktproxy import __version__
from ktproxy.errors import KtError
from ktproxy.log import setup_logging
from ktwire import sshwire

# Each module defines register(subparsers, common) and run(args) -> int.
COMMANDS = ["connect", "exchange", "mesh", "preview", "forward", "recover", "clean", "status"]


def _common_parser(suppress: bool = False) -> argparse.ArgumentParser:
    """Global flags, accepted before and after the command name.

    The copy given to sub-commands uses SUPPRESS defaults: otherwise argparse would overwrite a flag
    given before the command (`ktctl -n ns connect`) with the sub-parser's default.
    """
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS if suppress else None)
    g = common.add_argument_group("global options")
    g.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's, else default)")
    g.add_argument("--kubeconfig", help="path to the kubeconfig file")
    g.add_argument("--context", help="kubeconfig context to use")
    g.add_argument("-i", "--image", help="shadow pod image")
    g.add_argument("--image-pull-secret", "--imagePullSecret", dest="image_pull_secret")
    g.add_argument("--service-account", "--serviceAccount", dest="service_account")
    g.add_argument("--node-selector", "--nodeSelector", dest="node_selector", help="k1=v1,k2=v2")
    g.add_argument("--with-label", "--withLabel", dest="with_label", help="extra labels k1=v1,k2=v2")
    g.add_argument("--with-annotation", "--withAnnotation", dest="with_annotation", help="k1=v1,...")
    g.add_argument("--pod-quota", "--podQuota", dest="pod_quota", help="cpu,memory e.g. 500m,512Mi")
    g.add_argument("-d", "--debug", action="store_true", help="debug logging")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ktctl", parents=[_common_parser()],
        description="Reach a Kubernetes cluster from your laptop without root (kt-connect compatible).",
    )
    parser.add_argument("--version", action="version", version=f"ktctl (ktproxy) {__version__}")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    common = _common_parser(suppress=True)
    for name in COMMANDS:
        importlib.import_module(f"ktproxy.commands.{name}").register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "subcommand", None):
        parser.print_help()
        return 2
    setup_logging(args.debug)
    sshwire.install()
    try:
        return int(args.func(args) or 0)
    except KtError as exc:
        logging.getLogger("ktproxy").error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
