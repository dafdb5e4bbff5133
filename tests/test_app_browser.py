"""The xT app in a real browser: for each task the test starts `xt-hf app` on a local port, drives the page with
headless Chromium (the system's, through Playwright: nothing downloaded), uploads a generated image, waits for the
answer, checks what the page shows and saves a screenshot; a text file renamed .png must get a sentence, not a
traceback. Skipped, with the reason, where Gradio, Playwright or Chromium is missing.

Screenshots go to `$XT_HF_APP_ARTIFACTS` (default: a temporary folder), which the test prints.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xt_hf_app.browser import (answer_upload, browser_page, example_file, missing_requirements, save_screenshot,
                               served, set_threshold, shown_image_count, task_model)

pytestmark = pytest.mark.skipif(missing_requirements() is not None, reason=f"no browser test: {missing_requirements()}")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("XT_HF_APP_ARTIFACTS") or tmp_path_factory.mktemp("app-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser test screenshots: {folder}")
    return folder


@pytest.mark.parametrize("task, expected", [
    ("classification", ("above-left", "above-right", "below-left", "below-right")),
    ("segmentation", ("class(es) besides background",)),
    ("detection", ("object(s) with a score of at least",)),
])
def test_the_page_answers_an_uploaded_image(task, expected, tmp_path, artifacts):
    model = task_model(task, tmp_path)
    image = example_file(task, model, tmp_path)
    bad = tmp_path / "notes.png"
    bad.write_text("a text file, renamed .png\n")
    with served(model, log=artifacts / f"{task}-server.log") as url, browser_page() as page:
        status, seconds = answer_upload(page, url, image)
        print(f"{task}: the page answered in {seconds:.2f} s: {status.strip()}")
        assert any(text in status for text in expected), status
        assert "Cannot use" not in status
        assert shown_image_count(page, "xt-result") >= 1
        if task == "classification":
            assert shown_image_count(page, "xt-relevance") >= 1
            assert any(name in page.locator("#xt-label").inner_text() for name in expected)
        else:
            assert page.locator("#xt-legend").inner_text().strip()
        if task == "detection":  # the slider redraws the boxes without running the model again
            assert "at least 0.05" in set_threshold(page, 0.05)
        save_screenshot(page, artifacts / f"app-{task}.png")

        status, _ = answer_upload(page, url, bad)
        assert "Cannot use this input" in status and "notes.png" in status, status
        assert "Traceback" not in page.content()
        save_screenshot(page, artifacts / f"app-{task}-bad-upload.png")
