"""The `flagtree` command line: `flagtree_py.cli.main:main`, one module per subcommand.

Each command module has `add_parser(subparsers)`, which registers its arguments and sets `run`, and
`run(args) -> int`, the exit status. Command modules import torch and the models lazily, inside `run`,
so `flagtree --version` and `flagtree targets` start quickly.
"""
