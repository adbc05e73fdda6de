"""The ``cloudkon`` console command (and ``python -m cloudkon``): ``cloudkon client ...``,
``cloudkon scheduler ...`` or ``cloudkon worker ...``, each the command line of that name."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "client": "submit a workload and collect its results (python client.py)",
    "scheduler": "run tasks sent by clients on local or remote workers (python scheduler.py)",
    "worker": "run bundles from SQS on this machine, in remote mode (python worker.py)",
}
USAGE = "usage: cloudkon {" + ",".join(COMMANDS) + "} [options]   (cloudkon COMMAND --help for its options)"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        listed = "\n".join(f"  {name:<10} {what}" for name, what in COMMANDS.items())
        print(f"{USAGE}\n\ncommands:\n{listed}")
        return 0 if args else 2
    if args[0] == "--version":
        from cloudkon import __version__
        print(f"cloudkon {__version__}")
        return 0
    if args[0] not in COMMANDS:
        print(f"{USAGE}\ncloudkon: error: unknown command {args[0]!r}", file=sys.stderr)
        return 2
    return importlib.import_module(f"cloudkon.{args[0]}").main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
