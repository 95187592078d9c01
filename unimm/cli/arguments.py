"""Argument-parsing pieces shared by the subcommands."""

from __future__ import annotations

import argparse


class IntermixedArgumentParser(argparse.ArgumentParser):
    """Accepts positionals on both sides of options, so ``inspect SHARDS --config c.yaml key=value``
    collects both ``SHARDS`` and ``key=value`` (plain argparse stops collecting at the first option)."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        # argparse cannot intermix around subcommands; parsers that have them parse the plain way.
        has_subcommands = any(isinstance(action, argparse._SubParsersAction) for action in self._actions)
        if self._intermixing or has_subcommands:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False
