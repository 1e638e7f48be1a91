"""Text side: the official instruction templates and tokenisation with the image placeholder expanded."""

from __future__ import annotations

from collections.abc import Sequence

from virtue.errors import InputError

IMAGE_TOKEN = "<|image_pad|>"
# Raw MMEB / SCaR rows carry Phi-3-V's image token; the official loaders swap it for Qwen's.
DATASET_IMAGE_TOKEN = "<|image_1|>"
DEFAULT_IMAGE_TEXT = f"{IMAGE_TOKEN}\nRepresent the given image.\n"

SCAR_INSTRUCTION = (
    "Find the caption that best describes the segmented object, considering both local details and "
    "global context in the given image."
)


def with_image_token(text: str | None, has_image: bool, where: str) -> str:
    """Normalise a text so it holds exactly one image placeholder iff there is an image."""
    if text is None:
        return DEFAULT_IMAGE_TEXT if has_image else ""
    text = text.replace(DATASET_IMAGE_TOKEN, IMAGE_TOKEN)
    count = text.count(IMAGE_TOKEN)
    if not has_image:
        if count:
            raise InputError(f"{where}: text contains {IMAGE_TOKEN} but no image was given")
        return text
    if count > 1:
        raise InputError(f"{where}: text contains {count} image placeholders; one image per input is supported")
    return text if count == 1 else f"{IMAGE_TOKEN}\n{text}"


def expand_image_tokens(ids: list[int], image_token_id: int, num_tokens: int) -> list[int]:
    """Replace the single placeholder id by `num_tokens` copies (one per merged visual token)."""
    i = ids.index(image_token_id)
    return ids[:i] + [image_token_id] * num_tokens + ids[i + 1 :]


def _box_text(box: Sequence[float]) -> str:
    return str([int(v) if float(v).is_integer() else float(v) for v in box])


def scar_query_text(box_xyxy: Sequence[float], instruction: str = SCAR_INSTRUCTION) -> str:
    """The official SCaR evaluation query (virtue-spec §5.3), box as raw-pixel XYXY in the text."""
    return f"{IMAGE_TOKEN} \n{instruction}\nReferring object bbox: {_box_text(box_xyxy)}"


def scar_train_query_text(qry: str, box_xyxy: Sequence[float]) -> str:
    """The official SCaR training query: the row's `qry` plus the box (virtue-spec §5.2)."""
    return qry.replace(DATASET_IMAGE_TOKEN, IMAGE_TOKEN) + "\nReferring object bbox: " + _box_text(box_xyxy)


def mmeb_query_text(instruction: str, text: str = "", *, with_image: bool = True, family: str = "cls") -> str:
    """An MMEB evaluation query as the official dataset code builds it (virtue-spec §5.4): placeholder,
    instruction and text joined by spaces, " \n" folded to "\n", a trailing newline.

    instruction: as the dataset stores it (a leading `<|image_1|>` is dropped, its newline kept).
    family: "cls" / "i2t" keep the instruction as given; "qa" / "vg" put it on its own line;
        "t2i" queries have no image.
    """
    if family not in ("cls", "i2t", "qa", "vg", "t2i"):
        raise InputError(f"family: expected one of cls, i2t, qa, vg, t2i, got {family!r}")
    instruction = instruction.replace(DATASET_IMAGE_TOKEN, "")
    if family in ("qa", "vg"):
        instruction = "\n" + instruction.strip()
    parts = [IMAGE_TOKEN] if with_image and family != "t2i" else []
    parts += [p for p in (instruction, text) if p]
    return " ".join(parts).replace(" \n", "\n") + "\n"


def mmeb_candidate_text(instruction: str = "Represent the given image.", caption: str = "") -> str:
    """An MMEB image candidate: placeholder, instruction, optional caption, trailing newline."""
    body = " ".join(p for p in (instruction, caption) if p)
    return f"{IMAGE_TOKEN} {body}\n"
