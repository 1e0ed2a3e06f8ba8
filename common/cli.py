"""The ``fedseg`` command: one entry point that dispatches to the commands of the installed parts
(a hospital image ships ``client/`` without ``server/`` and ``simulations/``), plus ``certs``."""

from __future__ import annotations

import argparse
import importlib
import sys

from fedseg.common.logs import setup_logging

# Each part registers its commands with ``add_commands(subparsers)``; missing parts are skipped.
PARTS = ("fedseg.simulations.cli", "fedseg.client.cli", "fedseg.server.cli")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run one command; errors print one clear line, never a traceback."""
    parser = argparse.ArgumentParser(prog="fedseg", description="federated medical image segmentation")
    sub = parser.add_subparsers(dest="command", required=True)
    for part in PARTS:
        try:
            module = importlib.import_module(part)
        except ModuleNotFoundError as err:
            if err.name and part.startswith(err.name):
                continue  # this installation does not ship that part
            raise
        module.add_commands(sub)
    _add_certs(sub)
    args = parser.parse_args(argv)
    setup_logging()
    from fedseg.common.config import ConfigError
    from fedseg.common.errors import DataError

    try:
        return args.func(args)
    except (ConfigError, DataError) as err:
        print(f"fedseg {args.command}: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"fedseg {args.command}: {err}", file=sys.stderr)
        return 1


def _add_certs(sub: argparse._SubParsersAction) -> None:
    certs = sub.add_parser("certs", help="make TLS certificates (coordinator) or a node key (hospital)")
    certs_sub = certs.add_subparsers(dest="kind", required=True)
    server = certs_sub.add_parser("server", help="CA + SuperLink certificate")
    server.add_argument("out")
    server.add_argument("--host", action="append", required=True,
                        help="IP or DNS name the SuperLink is reached at (repeatable)")
    server.add_argument("--days", type=int, default=365)
    node = certs_sub.add_parser("node", help="a hospital SuperNode's authentication key pair")
    node.add_argument("out")
    node.add_argument("--name", required=True)
    certs.set_defaults(func=_certs)


def _certs(args: argparse.Namespace) -> int:
    from fedseg.common.credentials import write_node_key, write_server_certificates

    if args.kind == "server":
        files = write_server_certificates(args.out, args.host, args.days)
        print("wrote " + ", ".join(str(p) for p in files.values()))
        print("keep ca.key and server.key on the coordinator; give ca.crt to every hospital")
    else:
        private, public = write_node_key(args.out, args.name)
        print(f"wrote {private} (stays at the hospital) and {public} (send to the coordinator)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
