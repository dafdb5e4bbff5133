"""Regenerate `modeling/<hub_name>/{README.md, config.json}` and the model's Space (`space/app.py`, `space/README.md`,
`space/requirements.txt`: the xT app on it) for every variant in `variants.json`.

    python -m conversion.make_model_cards [--check]

The cards and configs are generated from the same registry and config builder as the conversion, so
they cannot drift from what `convert_original_checkpoint.py` writes. `--check` fails if any file is stale.
The configs leave out `transformers_version`: it records which release wrote the file, not what the model
is, so a new transformers release must not make every config stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.exit(f"Run this as a module from the repository root: python -m conversion.{Path(__file__).stem} ...")

from .convert_original_checkpoint import load_variants  # noqa: E402
from .model_card import render_model_card, render_space_files  # noqa: E402
from .original_config import xt_config_from_original  # noqa: E402

MODELING = Path(__file__).resolve().parents[1] / "modeling"
# Fields that record the writing library's version rather than the model.
WRITER_RECORDS = frozenset({"transformers_version"})


def expected_files() -> dict[Path, str]:
    """Every generated file and its content."""
    files = {}
    for entry in load_variants().values():
        config = xt_config_from_original(entry["original_config"])
        folder = MODELING / entry["hub_name"]
        repo_id = f"xt-hf/{entry['hub_name']}"
        files[folder / "README.md"] = render_model_card(entry, config, repo_id=repo_id)
        for name, content in render_space_files(entry, config, repo_id).items():
            files[folder / "space" / name] = content
        fields = {key: value for key, value in config.to_diff_dict().items() if key not in WRITER_RECORDS}
        files[folder / "config.json"] = json.dumps(fields, indent=2, sort_keys=True) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report stale files instead of writing")
    arguments = parser.parse_args(argv)
    stale = []
    for path, content in expected_files().items():
        if path.exists() and path.read_text() == content:
            continue
        stale.append(path)
        if not arguments.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    if arguments.check and stale:
        print("stale: " + ", ".join(str(p.relative_to(MODELING.parent)) for p in stale), file=sys.stderr)
        return 1
    print(f"{'checked' if arguments.check else 'wrote'} {len(expected_files())} files under {MODELING}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
