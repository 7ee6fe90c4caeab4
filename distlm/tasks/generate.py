"""(placeholder: being written)"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT")


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError
