"""The Gradio page: one xT model, an upload or a generated example in, the task's answer and its context out.

Element ids (`xt-upload`, `xt-example`, `xt-status`, `xt-result`, `xt-label`, `xt-relevance`, `xt-threshold`) are what
the browser test and the screenshot command (`xt_hf_app.browser`) find the page's parts by.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from .inference import (AppError, Answer, LoadedModel, draw_boxes, draw_class_map, draw_relevance, example_image,
                        legend, load_model, open_image, run)

INTRO = {
    "classification": "The top classes for the whole image, and **where the context came from**: each region tinted by "
                      "how much its tokens moved the answer shown (its share in per cent).",
    "segmentation": "The class map over the image, class by class in the legend's colours (class 0 left undrawn).",
    "detection": "Boxes over the image with their class and score; the slider hides boxes below a score without "
                 "running the model again.",
}
RELEVANCE_NOTE = ("Relevance: |gradient × (tokens − the image's mean token)| of the shown class's logit, summed over "
                  "each region's tokens and normalised to 100 % (docs/app.md).")


def build_app(model: str | LoadedModel, *, region_batch_size: int | None = None) -> gr.Blocks:
    """The page for `model` (a folder, a Hub repo id, or a `LoadedModel`); `region_batch_size` overrides the
    model's saved value for every run."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    config = loaded.model.config
    region, labels = config.region_size, loaded.labels
    detection = loaded.task == "detection"

    def answer_outputs(answer: Answer, threshold: float, what: str):
        rows, cols = answer.regions
        size = f"{rows} × {cols} regions of {region} px, answered in {answer.seconds:.2f} s"
        result, legend_html, top, relevance = answer.view, "", None, None
        if answer.task == "classification":
            top = answer.probabilities
            best = max(top, key=top.get)
            headline = f"**{best}** ({top[best]:.1%})"
            relevance = draw_relevance(answer.view, answer.relevance, region_size=region, scale=answer.scale)
        elif answer.task == "segmentation":
            present = {int(label) for label in set(answer.class_map.ravel().tolist())}
            result = draw_class_map(answer.view, answer.class_map)
            legend_html = legend(labels, present)
            headline = f"**{len(present - {0})} class(es)** besides {labels[0]}"
        else:
            result, kept = draw_boxes(answer.view, answer.detections, scale=answer.scale, threshold=threshold,
                                      labels=labels)
            legend_html = legend(labels, {int(v) for v in answer.detections["labels"]}, background=False)
            headline = f"**{kept} object(s)** with a score of at least {threshold:.2f}"
        status = f"{headline} · {what} · {size}"
        return result, legend_html, top, relevance, status, answer

    def failed(message: str):
        return None, "", None, None, f"**Cannot use this input.** {message}", None

    def answer_for(source, threshold: float, what: str, progress: gr.Progress):
        progress(0.0, desc="reading the image")
        answer = run(loaded, source, region_batch_size=region_batch_size, relevance=True, progress=True)
        return answer_outputs(answer, threshold, what)

    def on_upload(path, threshold, progress=gr.Progress(track_tqdm=True)):
        if path is None:
            return failed("No file was uploaded.")
        try:
            source = open_image(Path(path), region)
            return answer_for(source, threshold, f"upload {Path(path).name}", progress)
        except AppError as error:
            return failed(str(error))

    def on_example(seed, threshold, progress=gr.Progress(track_tqdm=True)):
        image, what = example_image(loaded.task, region, int(seed or 0))
        try:
            return answer_for(open_image(image, region), threshold, what, progress)
        except AppError as error:
            return failed(str(error))

    def on_threshold(threshold, answer):
        if answer is None or answer.task != "detection":
            return gr.update(), gr.update()
        picture, kept = draw_boxes(answer.view, answer.detections, scale=answer.scale, threshold=threshold,
                                   labels=labels)
        return picture, f"**{kept} object(s)** with a score of at least {threshold:.2f}"

    with gr.Blocks(title=f"xT · {loaded.name}") as page:
        gr.Markdown(f"# xT · {loaded.name}\n{loaded.task.capitalize()} with regions of {region} × {region} px "
                    f"({sum(p.numel() for p in loaded.model.parameters()) / 1e6:.2f} M parameters). "
                    f"{INTRO[loaded.task]} Large images are read and encoded region by region; the page shows a "
                    f"view of at most 1024 px a side.")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                upload = gr.File(label="Upload an image (PNG, JPEG, TIFF/BigTIFF, .npy, whole-slide)",
                                 type="filepath", height=120, elem_id="xt-upload")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, label="example number", elem_id="xt-seed")
                    example = gr.Button("Run a generated example", variant="primary", elem_id="xt-example")
                threshold = gr.Slider(0.05, 1.0, value=0.3, step=0.05, label="lowest score shown",
                                      visible=detection, elem_id="xt-threshold")
                status = gr.Markdown("Upload an image or run a generated example.", elem_id="xt-status")
                top = gr.Label(num_top_classes=min(5, len(labels)), label="top classes",
                               visible=loaded.task == "classification", elem_id="xt-label")
                legend_html = gr.HTML("", elem_id="xt-legend")
            with gr.Column(scale=3):
                with gr.Row():
                    result = gr.Image(label="answer", type="pil", interactive=False, height=520, elem_id="xt-result")
                    relevance = gr.Image(label="where the context came from", type="pil", interactive=False,
                                         height=520, visible=loaded.task == "classification", elem_id="xt-relevance")
                if loaded.task == "classification":
                    gr.Markdown(RELEVANCE_NOTE)
        outputs = [result, legend_html, top, relevance, status, state]
        upload.upload(on_upload, inputs=[upload, threshold], outputs=outputs)
        example.click(on_example, inputs=[seed, threshold], outputs=outputs)
        threshold.change(on_threshold, inputs=[threshold, state], outputs=[result, status])
    return page


__all__ = ["build_app"]
