"""`python -m xt_hf.training ...` (and `accelerate launch -m xt_hf.training ...`): the `xt-hf train` command."""

import sys

from .command import main

main(sys.argv[1:])
