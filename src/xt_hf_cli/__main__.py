"""`python -m xt_hf_cli ...` runs the `xt-hf` command line without the console script, e.g. under
`accelerate launch -m xt_hf_cli ...` or `torchrun -m xt_hf_cli ...`; help and argument errors answer without
importing torch."""

from . import main

main()
