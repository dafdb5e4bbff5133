"""`python -m xt_hf ...` runs the `xt-hf` command, as `python -m xt_hf_cli ...` does (the documented form, which
answers help without importing torch; this one imports the package first).

The library never imports its command line: this runs the `xt-hf` console script the installed distribution
declares (`[project.scripts]` in pyproject.toml), found through the distribution's metadata.
"""

import sys
from importlib.metadata import entry_points

scripts = entry_points(group="console_scripts", name="xt-hf")
if not scripts:
    sys.exit("error: `python -m xt_hf` runs the xt-hf command, which is not installed here; install xt-hf "
             "(pip install -e .) or run `python -m xt_hf_cli`")
main = next(iter(scripts)).load()
main()
