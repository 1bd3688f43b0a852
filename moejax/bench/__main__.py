"""`python -m moejax.bench step|moe|data|decode|attention|fit|compile [flags]`: runs `python -m moejax.bench.<name> [flags]`.

Each benchmark is its own module with its own flags (`python -m moejax.bench.moe --help`).
"""

import importlib
import sys

SUBCOMMANDS = ('step', 'moe', 'data', 'decode', 'attention', 'fit', 'compile')


def main() -> None:
  if len(sys.argv) < 2 or sys.argv[1] not in SUBCOMMANDS:
    given = f' (got {sys.argv[1]!r})' if len(sys.argv) > 1 else ''
    print(f'moejax: error: usage: python -m moejax.bench {"|".join(SUBCOMMANDS)} [flags]{given}; '
          f'each takes its own flags: python -m moejax.bench.<name> --help', file=sys.stderr)
    sys.exit(2)
  name = sys.argv.pop(1)
  sys.argv[0] = f'moejax.bench.{name}'
  importlib.import_module(f'moejax.bench.{name}').main()


if __name__ == '__main__':
  main()
