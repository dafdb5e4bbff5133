"""The app in a real browser: serve it, drive it with headless Chromium, take screenshots.

The browser test (`tests/test_app_browser.py`) and the documentation's screenshots use the same steps:

    python -m xt_hf_app.browser --output docs      # docs/app-classification.png, -segmentation, -detection

Chromium is the system's (Debian: `apt-get install chromium`), driven through Playwright's Python package; nothing
is downloaded at run time (`playwright install` is never needed). `XT_HF_CHROMIUM` names another binary.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ANSWERED = re.compile(r"answered in|Cannot use")
SCREENSHOT_LIMIT = 200_000  # bytes: small enough for a README's first screen
# Tiny random-weight heads for the tasks without a packaged trained model: (task, region size, labels).
RANDOM_MODELS = {
    "segmentation": (64, ("background", "near-shore vessel", "offshore vessel")),
    "detection": (128, ("red zone", "yellow zone")),
}


def chromium_path() -> str | None:
    """The Chromium binary to drive: `XT_HF_CHROMIUM`, else `chromium` on the PATH (Debian's package)."""
    return os.environ.get("XT_HF_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def missing_requirements() -> str | None:
    """Why the browser cannot run here (a sentence), or None when Gradio, Playwright and Chromium are all there."""
    import importlib.util

    for package, how in (("gradio", "pip install 'xt-hf[app]'"), ("playwright", "pip install playwright")):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed ({how})"
    if chromium_path() is None:
        return "no Chromium binary (apt-get install chromium, or set XT_HF_CHROMIUM)"
    return None


def random_model(task: str, folder: str | os.PathLike) -> str:
    """Save a tiny random-weight xT segmenter or detector (ConvNeXt regions, one attention layer) and its processor
    in `folder`, for the tasks that have no packaged trained model; returns the folder."""
    from xt_hf import XTConfig, XTForObjectDetection, XTForSemanticSegmentation, XTImageProcessor

    region, labels = RANDOM_MODELS[task]
    config = XTConfig(
        region_size=region,
        backbone_config=dict(model_type="convnext", num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                             out_features=["stage1", "stage2"]),
        context_encoder="attention", context_hidden_size=32, context_num_heads=2, context_num_layers=1,
        classifier="pool", num_labels=len(labels), id2label=dict(enumerate(labels)), decoder_hidden_size=16,
        decoder_output_stride=4,
    )
    import torch

    torch.manual_seed(0)
    head = XTForSemanticSegmentation if task == "segmentation" else XTForObjectDetection
    head(config).save_pretrained(folder)
    XTImageProcessor(region_size=region).save_pretrained(folder)
    return str(folder)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served(model: str, *, port: int | None = None, timeout: float = 120.0, log: str | os.PathLike | None = None):
    """`xt-hf app --model model` in a child process on a local port; yields the page's URL, stops it afterwards."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}/"
    environment = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with open(log or os.devnull, "w") as output:
        server = subprocess.Popen([sys.executable, "-m", "xt_hf_cli", "app", "--model", str(model), "--port",
                                   str(port)], stdout=output, stderr=subprocess.STDOUT, env=environment)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"the app exited with status {server.returncode} before serving"
                                       + (f" (log: {log})" if log else ""))
                try:
                    with urllib.request.urlopen(url, timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the app did not answer at {url} within {timeout:.0f} s") from None
                    time.sleep(0.5)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 820):
    """A page of headless system Chromium (Playwright), `width × height` CSS px."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def answer_upload(page, url: str, image: str | os.PathLike, *, timeout: float = 300.0) -> tuple[str, float]:
    """Open the app at `url`, upload the file `image`, wait for the answer; returns the status line's text and the
    seconds from the upload to the answer on the page."""
    page.goto(url)
    page.locator("#xt-upload input[type=file]").wait_for(state="attached", timeout=60_000)
    start = time.perf_counter()
    page.locator("#xt-upload input[type=file]").set_input_files(str(image))
    status = page.locator("#xt-status")
    status.get_by_text(ANSWERED).wait_for(timeout=timeout * 1000)
    return status.inner_text(), time.perf_counter() - start


def set_threshold(page, value: float, *, timeout: float = 60.0) -> str:
    """Move the detection page's score slider to `value` (through its number box) and wait for the boxes redrawn;
    returns the status line."""
    box = page.locator("#xt-threshold input[type=number]")
    box.fill(f"{value:g}")
    box.press("Enter")
    status = page.locator("#xt-status")
    status.get_by_text(f"at least {value:.2f}").wait_for(timeout=timeout * 1000)
    page.wait_for_timeout(1000)  # the outputs fade in after the status line
    return status.inner_text()


def shown_image_count(page, element_id: str) -> int:
    """How many decoded images (a result, an overlay) the element shows."""
    return page.evaluate("id => [...document.querySelectorAll(`#${id} img`)].filter(i => i.complete && "
                         "i.naturalWidth > 0).length", element_id)


def save_screenshot(page, path: str | os.PathLike, *, limit: int = SCREENSHOT_LIMIT) -> Path:
    """The page as a PNG of at most `limit` bytes (palette colours, then smaller if needed)."""
    from PIL import Image

    picture = Image.open(io.BytesIO(page.screenshot(full_page=False))).convert("RGB")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        buffer = io.BytesIO()
        picture.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= limit or picture.width < 400:
            path.write_bytes(buffer.getvalue())
            return path
        picture = picture.resize((picture.width * 4 // 5, picture.height * 4 // 5), Image.Resampling.LANCZOS)


def task_model(task: str, folder: str | os.PathLike) -> str:
    """The model the app shows for `task`: the packaged demo classifier, or a tiny random-weight segmenter or
    detector saved under `folder`."""
    if task == "classification":
        import importlib.util

        return str(Path(importlib.util.find_spec("xt_hf").submodule_search_locations[0]) / "demo_model")
    return random_model(task, Path(folder) / task)


def example_file(task: str, model: str, folder: str | os.PathLike, seed: int = 0) -> Path:
    """A generated example for `task` at the model's region size, saved as a PNG under `folder`."""
    import json

    from PIL import Image

    from .inference import example_image

    region = json.loads((Path(model) / "config.json").read_text())["region_size"]
    image, _ = example_image(task, region, seed)
    path = Path(folder) / f"{task}-example-{seed}.png"
    Image.fromarray(image).save(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Screenshots of the xT app for each task, through headless Chromium.")
    parser.add_argument("--output", default="docs", help="folder for app-<task>.png (default: docs)")
    parser.add_argument("--tasks", nargs="+", default=["classification", "segmentation", "detection"])
    arguments = parser.parse_args(argv)
    reason = missing_requirements()
    if reason:
        sys.exit(f"error: {reason}")
    with tempfile.TemporaryDirectory() as work:
        for task in arguments.tasks:
            model = task_model(task, work)
            image = example_file(task, model, work)
            with served(model, log=Path(work) / f"{task}.log") as url, browser_page() as page:
                status, seconds = answer_upload(page, url, image)
                if task == "detection":  # a random-weight detector's scores are low: show its boxes all the same
                    status = set_threshold(page, 0.05)
                path = save_screenshot(page, Path(arguments.output) / f"app-{task}.png")
            print(f"{path}: {path.stat().st_size / 1000:.0f} kB; answered in {seconds:.1f} s on the page; "
                  f"{status.strip()}")


if __name__ == "__main__":
    main()


__all__ = ["CHROMIUM_ARGS", "answer_upload", "browser_page", "chromium_path", "example_file", "missing_requirements",
           "random_model", "save_screenshot", "served", "set_threshold", "shown_image_count", "task_model"]
