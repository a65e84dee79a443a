"""The ``masksam-core`` command line.

Each verb lives next to the code it drives and registers itself here through an
``add_cli(subparsers)`` function that sets ``func`` on its parser. Errors a user
can act on (:class:`~masksam_core.errors.MaskSAMError`) are printed as one clear
message and exit with status 1; nothing else is caught.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .errors import MaskSAMError


def build_parser() -> argparse.ArgumentParser:
    from . import demo, evaluation, info, weights
    from .data import dataset
    from .inference import box_prompt
    from .inference import predict_cli as predict
    from .runs import export
    from .training import cli as train

    parser = argparse.ArgumentParser(
        prog="masksam-core",
        description="MaskSAM: automatic 3D medical image segmentation with Segment Anything.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (info, weights, dataset, train, evaluation, predict, box_prompt, export, demo):
        module.add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MaskSAMError as error:
        print(f"masksam-core {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"masksam-core {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # the file system refused (space, permissions, a path in the way): no traceback
        print(f"masksam-core {args.command}: error: {error}; check the paths, their permissions and the free "
              "space", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
