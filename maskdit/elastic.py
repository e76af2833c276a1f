"""`python -m maskdit.elastic <torchrun args>`: the training container's top process (maskdit/core/elastic.py)."""

import sys

from maskdit.core.elastic import main

if __name__ == "__main__":
    sys.exit(main())
