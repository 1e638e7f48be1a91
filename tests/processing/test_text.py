"""Query helpers reproduce the texts the official code builds (strings from virtue-spec §5.3 and the
official fixture's case notes)."""

from __future__ import annotations

from virtue import mmeb_query_text, scar_query_text
from virtue.processing.text import scar_train_query_text

SCAR_EVAL = (
    "<|image_pad|> \nFind the caption that best describes the segmented object, considering both local details "
    "and global context in the given image.\nReferring object bbox: [0, 417, 681, 510]"
)


def test_scar_eval_query():
    assert scar_query_text([0, 417, 681, 510]) == SCAR_EVAL


def test_scar_train_query():
    expected = "<|image_pad|>\nFind it.\nReferring object bbox: [1, 2, 3, 4]"
    assert scar_train_query_text("<|image_1|>\nFind it.", [1, 2, 3, 4]) == expected


def test_mmeb_queries():
    raw = "<|image_1|>\nRepresent the given image for classification"
    assert mmeb_query_text(raw, "", family="cls") == "<|image_pad|>\nRepresent the given image for classification\n"
    assert mmeb_query_text("Answer:", "What colour?", family="qa") == "<|image_pad|>\nAnswer: What colour?\n"
    assert mmeb_query_text("Find an image:", "a dog", family="t2i") == "Find an image: a dog\n"
