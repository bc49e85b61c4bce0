"""`python tests/fault_cli.py ARGS`: the ndbench CLI with the test-only "faulty" method
registered, for tests that need a real separate process (signals, two runs, file-size limits)."""

import sys

from fault_methods import register_fault_methods

from benchmark.cli import main

if __name__ == "__main__":
    register_fault_methods()
    sys.exit(main(sys.argv[1:]))
