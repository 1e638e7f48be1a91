"""Every case of the official-implementation fixture reproduced within 1e-5 (fp32, normalised), from the
official layout and after `convert` to the library layout. The fixture directory comes from
VIRTUE_PARITY_FIXTURE, so any fixture of this format runs the same way."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.conftest import FIXTURE, fixture_cases
from virtue import Box, EmbedInput, Points, VirtueModel, VisualPrompt

ATOL = 1e-5
INTERMEDIATE_ATOL = 1e-5  # they agree to ~4e-6
CASES = fixture_cases()


def test_fixture_has_cases():
    """An empty fixture would make the parametrised parity tests below vanish instead of fail."""
    assert len(CASES) >= 1, f"no cases in {FIXTURE / 'cases.json'}"
    with safe_open(str(FIXTURE / "expected.safetensors"), "pt") as f:
        stored = set(f.keys())
    missing = [c["name"] for c in CASES if f"{c['name']}/embedding" not in stored]
    assert not missing, f"cases without expected embeddings: {missing}"


def case_inputs(case: dict) -> tuple[list[EmbedInput], tuple[int, int] | None]:
    """The case's rows as public inputs: prompts converted to original-image pixels."""
    items, resize = [], None
    for j, row in enumerate(case["items"]):
        image = None
        if row["image"]:
            image = Image.open(FIXTURE / "images" / row["image"])
            resize = tuple(row["presquash_to"]) if row["presquash_to"] else None
        prompt = None
        if case["point"] is not None:  # stored in the SAM 1024 frame
            w, h = image.size
            x, y = case["point"]
            prompt = VisualPrompt(points=Points([[x * w / 1024, y * h / 1024]]))
        if case["bboxes"] is not None:  # raw pixels, as the public API takes them
            prompt = VisualPrompt(box=Box.from_xyxy(case["bboxes"][j]))
        items.append(EmbedInput(text=row["text"], image=image, prompt=prompt))
    return items, resize


def expected(case: dict) -> torch.Tensor:
    """Official embeddings; rows the official code makes batch-dependent use their batch-size-1 value."""
    with safe_open(str(FIXTURE / "expected.safetensors"), "pt") as f:
        exp = f.get_tensor(f"{case['name']}/embedding")
        dependent = set(case.get("batch_dependent_rows") or [])
        if dependent:
            bs1 = f.get_tensor(f"{case['name']}/embedding_bs1")
            exp = torch.stack([bs1[r] if r in dependent else exp[r] for r in range(len(exp))])
    return exp


def check_case(model: VirtueModel, case: dict) -> None:
    items, resize = case_inputs(case)
    got = model.encode(items, batch_size=case["batch_size"], image_resize=resize, convert_to_numpy=False)
    err = (got - expected(case)).abs().max().item()
    assert err <= ATOL, f"case {case['name']}: max |delta| {err:.2e} > {ATOL}"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_official_layout_parity(_official_model, case):
    check_case(_official_model, case)


@pytest.fixture(scope="module")
def converted_model(converted_dir):
    return VirtueModel.from_pretrained(converted_dir, allow_hub=False)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_converted_layout_parity(converted_model, case):
    check_case(converted_model, case)


def test_intermediates_match(_official_model, fixture_dir):
    """Localises a parity failure: SAM input, fused map and segmentation tokens wherever recorded."""
    model, proc = _official_model, _official_model.processor
    checked = 0
    with safe_open(str(fixture_dir / "expected.safetensors"), "pt") as f:
        for case in CASES:
            names = case["expected"]
            if "seg_tokens" not in names:
                continue
            items, resize = case_inputs(case)
            loaded = proc.load(items[0], case["name"], resize)
            sam_input = proc.sam_input(proc.prepare_image(loaded))
            with torch.no_grad():
                image_embed = model.sam.encode_images(sam_input[None])
                prompt = proc.sam_prompt(items[0], loaded.size_wh, model.sam.mask_input_size)
                fused = model.sam.fuse(image_embed, [prompt])
                tokens = model.connector(fused)
            pairs = [("seg_tokens", tokens)]
            if "sam_input_stride32" in names:
                pairs.append(("sam_input_stride32", sam_input[None, :, ::32, ::32]))
            if "fused_map_stride8" in names:
                pairs.append(("fused_map_stride8", fused[:, :, ::8, ::8]))
            for name, value in pairs:
                err = (value - f.get_tensor(names[name])).abs().max().item()
                assert err < INTERMEDIATE_ATOL, f"{case['name']}/{name}: max |delta| {err:.2e}"
            checked += 1
    assert checked, "the fixture records no seg_tokens intermediates"
