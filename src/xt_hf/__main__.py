"""`python -m xt_hf ...` runs the `xt-hf` command line (so that `accelerate launch -m xt_hf ...` works too)."""

from xt_hf_cli import main

main()
