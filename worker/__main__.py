"""``python -m worker`` is ``broker worker``."""

import sys

from broker.tools.cli import main

main(["worker", *sys.argv[1:]])
