"""The demo: its gallery embedding cache and search backend (fast), and the page driven in a real browser.

The browser test needs Debian's Chromium (`apt-get install -y chromium`) and `pip install playwright gradio`;
Playwright's own browser download is not used. It fails, rather than skips, when Chromium is missing, so a
CI that forgot to install it cannot pass silently. Its screenshot goes to $VIRTUE_TEST_ARTIFACTS (default:
the test's tmp_path).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import MINI_SCAR
from virtue.prompts import Points, VisualPrompt

IMAGES = sorted((MINI_SCAR / "images").glob("*.jpg"))
CAPTIONS = ["a horse on a sports field", "a bus on a city street", "a cup on a kitchen table"]
CHROMIUM = os.environ.get("VIRTUE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


@pytest.fixture
def gallery(tmp_path) -> Path:
    folder = tmp_path / "gallery"
    folder.mkdir()
    for src in IMAGES[:4]:
        shutil.copy2(src, folder / src.name)
    return folder


class _CountingEncode:
    """Wraps `model.encode` to count the images it embeds (cache hits must not reach the model)."""

    def __init__(self, model, monkeypatch):
        self.images = 0
        self._encode = model.encode
        monkeypatch.setattr(model, "encode", self)

    def __call__(self, inputs, **kwargs):
        if isinstance(inputs, list):  # a path, or an encode() dict with one (the search index's rows)
            self.images += sum(isinstance(x, Path) or (isinstance(x, dict) and "image" in x) for x in inputs)
        return self._encode(inputs, **kwargs)


def test_gallery_cache_hit_and_invalidation(tiny_model, gallery, tmp_path, monkeypatch):
    from virtue.apps.demo import build_gallery_index, fingerprint_of
    from virtue.search import open_index

    cache = tmp_path / "cache"
    fp = fingerprint_of(tiny_model)
    counter = _CountingEncode(tiny_model, monkeypatch)

    first = build_gallery_index(tiny_model, gallery, cache_dir=cache, show_progress=False, fingerprint=fp)
    assert (first.embedded, first.reused, counter.images) == (4, 0, 4)
    assert [p.name for p in first.paths] == [p.name for p in IMAGES[:4]]
    np.testing.assert_allclose(first.embeddings, counter._encode(list(first.paths)), atol=1e-5)
    assert open_index(first.cache_dir).count("image") == 4 and open_index(first.cache_dir).count("region") == 0
    stamp = open_index(first.cache_dir).table.version

    second = build_gallery_index(tiny_model, gallery, cache_dir=cache, show_progress=False)  # fingerprint again
    assert (second.embedded, second.reused, counter.images) == (0, 4, 4)
    np.testing.assert_array_equal(second.embeddings, first.embeddings)
    assert open_index(first.cache_dir).table.version == stamp  # a hit rewrites nothing

    # Changed content: only that file is embedded again.
    changed = gallery / IMAGES[1].name
    Image.open(changed).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed, quality=95)
    third = build_gallery_index(tiny_model, gallery, cache_dir=cache, show_progress=False, fingerprint=fp)
    assert (third.embedded, third.reused, counter.images) == (1, 3, 5)
    row = third.paths.index(changed.resolve())
    np.testing.assert_allclose(third.embeddings[row], counter._encode(changed), atol=1e-5)
    np.testing.assert_array_equal(np.delete(third.embeddings, row, 0), np.delete(first.embeddings, row, 0))

    # Touched (same bytes, new mtime), a removed file and a copy under a new name: nothing to embed.
    os.utime(gallery / IMAGES[0].name, ns=(1, 1))
    (gallery / IMAGES[3].name).unlink()
    shutil.copy2(gallery / IMAGES[2].name, gallery / "copy.jpg")
    fourth = build_gallery_index(tiny_model, gallery, cache_dir=cache, show_progress=False, fingerprint=fp)
    assert (fourth.embedded, fourth.reused, len(fourth.paths), counter.images) == (0, 4, 4, 5)

    # An unreadable file is reported and left out, not fatal.
    (gallery / "broken.jpg").write_bytes(b"not a jpeg")
    fifth = build_gallery_index(tiny_model, gallery, cache_dir=cache, show_progress=False, fingerprint=fp)
    assert (fifth.embedded, fifth.reused, len(fifth.paths)) == (0, 4, 4)
    assert len(fifth.skipped) == 1 and "broken.jpg" in fifth.skipped[0]
    (gallery / "broken.jpg").unlink()

    # Another model (fingerprint) never reads this cache.
    other = build_gallery_index(tiny_model, gallery, cache_dir=cache, show_progress=False, fingerprint="f" * 32)
    assert (other.embedded, other.reused) == (4, 0)


def test_backend_search_ranks_gallery_and_captions(tiny_model, gallery, tmp_path):
    from virtue.apps.demo import ClickPrompt, DemoBackend
    from virtue.model.mask_preview import predict_mask

    backend = DemoBackend(tiny_model, gallery, captions=CAPTIONS, cache_dir=tmp_path / "c", show_progress=False)
    image = np.asarray(Image.open(IMAGES[0]).convert("RGB"))
    h, w = image.shape[:2]
    clicks = ClickPrompt().click("Positive point", (w / 2, h / 2)).click("Box (2 clicks)", (5, 5))
    clicks = clicks.click("Box (2 clicks)", (w - 5, h - 9))
    prompt = clicks.visual_prompt()
    assert prompt.box.xyxy == (5, 5, w - 5, h - 9)
    result = backend.search(image, prompt, "Find it.", top_k=3, clicks=clicks)
    assert result.mask.shape == (h, w) and result.overlay.shape == (h, w, 3)
    np.testing.assert_array_equal(result.mask, predict_mask(tiny_model, image, prompt))
    query = tiny_model.encode({"image": image, "text": "Find it.", "box": list(prompt.box.xyxy),
                               "points": [[w / 2, h / 2]]})
    scores = backend.gallery.embeddings @ query
    assert [p for p, _ in result.gallery] == [backend.gallery.paths[i] for i in np.argsort(-scores)[:3]]
    np.testing.assert_allclose([s for _, s in result.gallery], np.sort(scores)[::-1][:3], atol=1e-5)
    assert len(result.captions) == 3 and {c for c, _ in result.captions} <= set(CAPTIONS)
    # Text-only query: no mask, still ranked.
    text_only = backend.search(None, None, "a horse", top_k=2)
    assert text_only.mask is None and len(text_only.gallery) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require_browser():
    """Playwright (the Python package) driving Debian's Chromium; a missing piece is a failure, not a skip."""
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install it with `apt-get update && apt-get install -y chromium` "
            "(or point VIRTUE_CHROMIUM at a Chromium binary)", pytrace=False,
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs Playwright: pip install playwright (its browsers are not needed)",
                    pytrace=False)
    try:
        import gradio  # noqa: F401
    except ImportError:
        pytest.fail("the demo needs Gradio: pip install gradio", pytrace=False)
    return sync_playwright


def test_demo_in_browser(tiny_model, gallery, tmp_path, monkeypatch):
    sync_playwright = _require_browser()
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls from a test
    from virtue.apps.demo import build_demo

    started = time.perf_counter()
    artifacts = Path(os.environ.get("VIRTUE_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "demo_browser.png"
    shot_box = artifacts / "demo_browser_box_mask.png"
    photo = IMAGES[0]
    pw, ph = Image.open(photo).size

    demo = build_demo(tiny_model, gallery, captions=CAPTIONS, cache_dir=tmp_path / "cache", show_progress=False)
    prompts: list[VisualPrompt | None] = []  # what each Search handed the backend
    search = demo.backend.search
    monkeypatch.setattr(demo.backend, "search", lambda image, prompt, *a, **k: (
        prompts.append(prompt), search(image, prompt, *a, **k))[1])
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    page_errors: list[str] = []
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1400, "height": 1000},
            )
            try:
                page = context.new_page()
                page.set_default_timeout(30_000)
                page.on("pageerror", lambda exc: page_errors.append(str(exc)))
                # Hermetic: the page may only talk to the demo server (no web fonts, no CDN).
                page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
                    ("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")) else route.abort())
                page.goto(url)
                page.locator("#query-image input[type=file]").set_input_files(str(photo))
                image = page.locator("#query-image img").first
                image.wait_for(state="visible")
                page.locator("#prompt-info").get_by_text("Image loaded").wait_for()
                box = image.bounding_box()
                assert box is not None
                image.click(position={"x": box["width"] * 0.5, "y": box["height"] * 0.5})
                page.locator("#prompt-info").get_by_text("1 positive").wait_for()

                page.locator("#search-button").click()
                page.locator("#search-status").get_by_text("mask covers").wait_for(timeout=60_000)
                results = page.locator("#results-gallery img")
                results.first.wait_for(state="visible")
                overlay = page.locator("#mask-overlay img").first
                overlay.wait_for(state="visible")
                page.wait_for_function(
                    "() => [...document.querySelectorAll('#results-gallery img, #mask-overlay img')]"
                    ".every(i => i.complete && i.naturalWidth > 0)"
                )
                overlay_size = overlay.evaluate("i => [i.naturalWidth, i.naturalHeight]")
                n_results = results.count()
                captions_text = page.locator("#caption-results").inner_text()
                page.screenshot(path=str(shot), full_page=True)

                # Second query: a box (two clicks) plus a painted mask, on the same photo.
                page.get_by_label("Box (2 clicks)").check()
                # Each click redraws the query image; click again only once the new picture has loaded (a
                # click on a loading <img> has no pixel coordinates), as a person would.
                query_loaded = "() => { const i = document.querySelector('#query-image img');" \
                               " return i && i.complete && i.naturalWidth > 0; }"
                page.wait_for_function(query_loaded)
                image.click(position={"x": box["width"] * 0.3, "y": box["height"] * 0.3})
                page.locator("#prompt-info").get_by_text("opposite corner").wait_for()
                page.wait_for_function(query_loaded)
                image.click(position={"x": box["width"] * 0.7, "y": box["height"] * 0.8})
                page.locator("#prompt-info").get_by_text("box [").wait_for()
                page.get_by_text("Paint a mask (optional)").click()
                canvas = page.locator("#mask-painter canvas").first
                canvas.wait_for(state="visible")
                cb = canvas.bounding_box()
                assert cb is not None
                x0, y0 = cb["x"] + cb["width"] * 0.45, cb["y"] + cb["height"] * 0.45
                page.mouse.move(x0, y0)
                page.mouse.down()
                for step in range(1, 16):
                    page.mouse.move(x0 + 4 * step, y0 + 3 * step)
                page.mouse.up()
                before = overlay.get_attribute("src")
                page.locator("#search-button").click()
                # Done when the overlay shows a new picture (the status line already reads "mask covers").
                page.wait_for_function(
                    "src => { const i = document.querySelector('#mask-overlay img');"
                    " return i && i.src !== src && i.complete && i.naturalWidth > 0; }", arg=before, timeout=60_000,
                )
                page.screenshot(path=str(shot_box), full_page=True)
            finally:
                context.close()
    finally:
        demo.close()
    print(f"\ndemo screenshots: {shot} {shot_box}  ({time.perf_counter() - started:.1f} s)")

    assert not page_errors, page_errors
    assert overlay_size == [pw, ph]  # the mask overlay is drawn on the uploaded photo, at its size
    assert n_results >= 4  # all 4 gallery images ranked (thumbnails; a preview may add one more)
    assert any(c in captions_text for c in CAPTIONS)
    assert shot.is_file() and shot.stat().st_size > 10_000
    # The page's prompts reached the backend in the photo's pixels: one click at the centre, then a box
    # and a painted stroke (the mask has the photo's shape, its pixels near the middle).
    assert len(prompts) == 2, prompts
    first, second = prompts
    assert first is not None and first.box is None and first.mask is None and first.points.labels == (1,)
    (x, y), = first.points.xy
    assert abs(x - pw / 2) < pw * 0.05 and abs(y - ph / 2) < ph * 0.05
    assert second is not None and second.box is not None and second.mask is not None
    x1, y1, x2, y2 = second.box.xyxy
    assert abs(x1 - pw * 0.3) < pw * 0.05 and abs(y2 - ph * 0.8) < ph * 0.05
    assert second.mask.array.shape == (ph, pw) and second.mask.array.any()


def test_click_prompt_box_needs_two_distinct_corners():
    from virtue.apps.demo import MODE_BOX, MODE_NEGATIVE, ClickPrompt

    c = ClickPrompt().click(MODE_BOX, (10, 10)).click(MODE_BOX, (10, 40))  # zero width: restart there
    assert c.box is None and c.box_start == (10, 40)
    c = c.click(MODE_BOX, (2, 50)).click(MODE_NEGATIVE, (3, 4))
    assert c.box == (2, 40, 10, 50) and c.labels == (0,)
    prompt = c.visual_prompt()
    assert isinstance(prompt, VisualPrompt) and prompt.points == Points([[3, 4]], [0])
    assert ClickPrompt().visual_prompt(np.zeros((4, 4), bool)) is None


def test_cli_demo_builds_the_page_and_launches_it(tiny_model, gallery, tmp_path, monkeypatch):
    import argparse

    import gradio as gr

    from virtue.cli import demo as cli_demo

    parser = argparse.ArgumentParser()
    cli_demo.register(parser.add_subparsers(dest="command"))
    captions = tmp_path / "captions.txt"
    captions.write_text("a horse\n\n  a bus  \n")
    args = parser.parse_args(["demo", "--model", "tiny", "--gallery", str(gallery), "--captions", str(captions),
                              "--cache-dir", str(tmp_path / "cache"), "--port", "7999"])
    monkeypatch.setattr(cli_demo, "load_model", lambda _: tiny_model)
    launched: dict = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw, blocks=self))
    assert args.run(args) == 0
    assert (launched["server_name"], launched["server_port"]) == ("127.0.0.1", 7999)
    backend = launched["blocks"].backend
    assert backend.captions == ["a horse", "a bus"] and len(backend.gallery.paths) == 4

    with pytest.raises(SystemExit, match="--gallery"):
        args.run(parser.parse_args(["demo", "--model", "tiny"]))
