"""`python -m llama_adapter_fast.cli` (what torchrun -m runs): the command line."""

import sys

from llama_adapter_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
