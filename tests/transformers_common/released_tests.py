"""transformers' own generic test mixins, from the source distribution of the installed transformers release.

The mixins (`tests/test_modeling_common.py`, `tests/test_configuration_common.py`,
`tests/test_image_processing_common.py`) ship in transformers' sdist, not in its wheel. `mixins()` fetches the sdist
once with `pip download --no-deps --no-binary :all: transformers==<installed>`, extracts those three files unchanged
into a package named `transformers_tests` (so that they cannot clash with this repository's `tests`), and puts the
package on `sys.path`. The cache is `$XT_HF_TRANSFORMERS_TESTS` when set, else `transformers-tests` in pytest's
cache folder; a cached sdist or extracted package is reused.

The three files import a few modules that the sdist does not hold. The package gets a stand-in for each, written
here (nothing of them is copied from transformers):
- `exporters/test_export.py`: an `ExportTesterMixin` with no tests. `ModelTesterMixin` inherits its torch.export,
  ONNX and ExecuTorch tests from it; they are not run (docs/transformers-tests.md).
- `generation/test_utils.py`: a `GenerationTesterMixin` with no tests, which `ModelTesterMixin` only names in an
  `issubclass` check (xT does not generate, so its testers must not inherit it anyway).
- `utils/test_configuration_utils.py`: an empty `config_common_kwargs`, read only by a `ConfigTester` check that
  returns early for configs with sub-configs, which `XTConfig` has (`backbone_config`).
- `utils/fetch_hub_objects_for_ci.py` (beside the package, where the image processing mixin looks for it): its
  `url_to_local_path` maps each test-image URL to a synthetic image of that URL's kind (an RGB photo, or a
  one-channel label map for a `.png` segmentation map), written into the cache, so no test reaches the network.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

MIXIN_FILES = ("test_modeling_common.py", "test_configuration_common.py", "test_image_processing_common.py")
PACKAGE = "transformers_tests"
# Set by this folder's conftest.py to pytest's cache folder; the fallback serves an import outside pytest.
cache_root: Path | None = None

_STAND_INS = {
    "__init__.py": '"""transformers\' generic test mixins, extracted from its sdist by xt-hf\'s tests."""\n',
    "exporters/__init__.py": "",
    "exporters/test_export.py": (
        '"""Stand-in written by xt-hf: the sdist lacks tests/exporters, so the export tests are not run."""\n\n\n'
        "class ExportTesterMixin:\n    pass\n"
    ),
    "generation/__init__.py": "",
    "generation/test_utils.py": (
        '"""Stand-in written by xt-hf: the sdist lacks tests/generation; xT does not generate."""\n\n\n'
        "class GenerationTesterMixin:\n    pass\n"
    ),
    "utils/__init__.py": "",
    "utils/test_configuration_utils.py": (
        '"""Stand-in written by xt-hf: the sdist lacks tests/utils. Only ConfigTester.check_config_arguments_init\n'
        'reads this, and it returns before doing so for a config with sub-configs (XTConfig has backbone_config)."""\n'
        "\nconfig_common_kwargs = {}\n"
    ),
}

_HUB_OBJECTS_STAND_IN = '''"""Stand-in written by xt-hf for transformers' utils/fetch_hub_objects_for_ci.py (not in the
sdist).

`url_to_local_path` returns a synthetic image of the URL's kind, made once and kept beside this file: a
one-channel label map for a `.png` segmentation map, else a 3-channel photo-like image. No network.
"""

from pathlib import Path

import numpy as np
from PIL import Image

_IMAGES = Path(__file__).resolve().parent / "synthetic_images"


def url_to_local_path(url, return_url_if_not_found=True):
    name = url.rstrip("/").rsplit("/", 1)[-1]
    path = _IMAGES / name
    if not path.exists():
        _IMAGES.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(sum(name.encode()))
        height, width = 96, 128
        if name.endswith(".png"):
            pixels = rng.integers(0, 150, size=(height, width), dtype=np.uint8)
        else:
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    return str(path)
'''


def installed_version() -> str:
    return importlib.metadata.version("transformers")


def download_command(version: str, destination: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"transformers=={version}", "-d", str(destination)]


def _cache() -> Path:
    if os.environ.get("XT_HF_TRANSFORMERS_TESTS"):
        return Path(os.environ["XT_HF_TRANSFORMERS_TESTS"])
    return cache_root or Path(tempfile.gettempdir()) / "xt-hf-transformers-tests"


def _sdist(version: str, cache: Path) -> Path:
    """The cached sdist of `version`, downloaded when missing; `RuntimeError` naming the command when pip fails."""
    sdists = cache / "sdist"
    found = sorted(sdists.glob(f"transformers-{version}.tar.gz"))
    if found:
        return found[0]
    command = download_command(version, sdists)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(sdists.glob(f"transformers-{version}.tar.gz"))
    if done.returncode or not found:
        last_line = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"`{' '.join(command[2:])}` failed ({last_line})")
    return found[0]


def _extract(sdist: Path, version: str, destination: Path) -> None:
    """The mixin files of `sdist` into `destination/transformers_tests`, with the stand-ins; atomic."""
    staging = Path(tempfile.mkdtemp(prefix="extracting-", dir=destination.parent))
    try:
        package = staging / PACKAGE
        package.mkdir()
        with tarfile.open(sdist) as archive:
            for name in MIXIN_FILES:
                member = archive.extractfile(f"transformers-{version}/tests/{name}")
                if member is None:
                    raise RuntimeError(f"{sdist.name} has no tests/{name}")
                (package / name).write_bytes(member.read())
        for relative, text in _STAND_INS.items():
            (package / relative).parent.mkdir(parents=True, exist_ok=True)
            (package / relative).write_text(text)
        (staging / "utils").mkdir()
        (staging / "utils" / "fetch_hub_objects_for_ci.py").write_text(_HUB_OBJECTS_STAND_IN)
        try:
            staging.rename(destination)
        except OSError:  # another process got there first
            if not (destination / PACKAGE).is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@functools.cache
def _package_root() -> Path | str:
    """The folder holding `transformers_tests` for the installed transformers, or why there is none."""
    version = installed_version()
    cache = _cache()
    root = cache / f"transformers-{version}"
    if not (root / PACKAGE / MIXIN_FILES[0]).is_file():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            _extract(_sdist(version, cache), version, root)
        except (RuntimeError, OSError, tarfile.TarError, KeyError) as error:
            command = " ".join(download_command(version, cache / "sdist")[2:])
            return (f"transformers' generic tests come from its sdist, fetched with `pip {command}`, which failed "
                    f"({error}); offline, put transformers-{version}.tar.gz in $XT_HF_TRANSFORMERS_TESTS/sdist")
    return root


def mixins(name: str):
    """The module `transformers_tests.<name>` (e.g. `"test_modeling_common"`); skips the calling test module with
    one reason when the sdist cannot be had."""
    root = _package_root()
    if isinstance(root, str):
        pytest.skip(root, allow_module_level=True)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"{PACKAGE}.{name}")
