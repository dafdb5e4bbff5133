"""Where `released_tests` keeps transformers' sdist and the mixins extracted from it (pytest's cache folder), and the
markers those mixins use (transformers registers them in its own conftest.py, which the sdist's tests/ lacks)."""

from . import released_tests

MIXIN_MARKERS = {
    "accelerate_tests": "need accelerate's big-model features",
    "slow": "are slow (run with RUN_SLOW=1)",
    "flash_attn_test": "need flash-attention 2",
    "flash_attn_3_test": "need flash-attention 3",
    "flash_attn_4_test": "need flash-attention 4",
    "torch_compile_test": "run torch.compile",
}


def pytest_configure(config):
    for name, meaning in MIXIN_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: transformers' generic tests that {meaning}")
    cache = getattr(config, "cache", None)
    if cache is not None:
        released_tests.cache_root = cache.mkdir("transformers-tests")
