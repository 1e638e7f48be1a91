"""`VirtueProcessor`'s checks, token ids and batch plan, without weights: what `encode` and the HTTP service share.

Counted against the tokenizer itself (a counting proxy) and against an independent token count (the text's ids,
the image placeholder expanded to the visual-token formula of the image's size)."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from PIL import Image

from virtue import ImageError, InputError, PromptError
from virtue.inputs import parse_input
from virtue.processing.batch import CheckedInput, VirtueProcessor, length_settings
from virtue.processing.text import IMAGE_TOKEN


class CountingTokenizer:
    """Forwards everything to the real tokenizer; counts the calls that tokenise a text."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.calls: list[str] = []

    def __call__(self, text, *args, **kwargs):
        self.calls.append(text)
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.fixture
def counted(tiny_model):
    counter = CountingTokenizer(tiny_model.processor.tokenizer)
    tiny_model.processor = VirtueProcessor(tiny_model.config, counter)
    return tiny_model, counter


def inputs(fixture_images) -> list:
    return ["a rocket on a pad", {"image": fixture_images["rocket.png"], "box": [108, 22, 132, 152], "text": "a box"},
            {"image": fixture_images["rocket.png"], "points": [[20, 20]]}, "two"]


def test_checked_inputs_carry_the_ids_the_model_reads(tiny_model, fixture_images):
    proc = tiny_model.processor
    checked = proc.check_inputs([parse_input(x, i) for i, x in enumerate(inputs(fixture_images))])
    assert all(isinstance(c, CheckedInput) for c in checked)
    assert checked[0].token_ids == tuple(proc.tokenizer("a rocket on a pad")["input_ids"])
    # an image row: the placeholder expanded to the image's visual tokens, counted here from the formula
    w, h = Image.open(fixture_images["rocket.png"]).size
    factor = tiny_model.config.image_processing.factor
    from virtue.processing.qwen import smart_resize

    rh, rw = smart_resize(h, w, tiny_model.config.image_processing)
    image_id = proc.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert checked[1].token_ids.count(image_id) == rh * rw // factor**2
    assert proc.sequence_length(checked[1]) == len(checked[1].token_ids) + tiny_model.config.sam.num_tokens
    assert proc.sequence_length(checked[0]) == len(checked[0].token_ids)
    assert checked[1].checked_for == length_settings(None, None, False)
    assert checked[1].prompt.box.xyxy == (108, 22, 132, 152) and checked[1].text == "a box"  # other fields kept


def test_encode_does_not_tokenise_checked_inputs_again(counted, fixture_images):
    model, counter = counted
    items = [parse_input(x, i) for i, x in enumerate(inputs(fixture_images))]
    checked = model.processor.check_inputs(items)
    assert len(counter.calls) == len(items)  # once each
    counter.calls.clear()
    got = model.encode(checked)
    assert counter.calls == []  # the ids travelled with the inputs
    np.testing.assert_allclose(got, model.encode(inputs(fixture_images)), atol=1e-6)
    assert len(counter.calls) == len(items)  # raw inputs: tokenised once per encode call (check and forward share)


def test_inputs_checked_for_other_settings_are_checked_again(counted, fixture_images):
    model, counter = counted
    checked = model.processor.check_inputs([parse_input("a rocket on a launch pad")])
    counter.calls.clear()
    short = model.encode(checked, max_length=3, truncate=True)
    assert len(counter.calls) == 1  # checked without a length limit: not reused
    np.testing.assert_allclose(short, model.encode(["a rocket on a launch pad"], max_length=3, truncate=True),
                               atol=1e-6)
    with pytest.raises(InputError, match="above the limit of 3"):
        model.processor.check_inputs(checked, max_length=3)


def test_one_error_names_every_bad_input(tiny_model, fixture_images, tmp_path):
    proc = tiny_model.processor
    bad = [parse_input({"image": fixture_images["rocket.png"], "box": [0, 0, 500, 20]}, 0),
           parse_input("fine", 1),
           parse_input({"image": tmp_path / "missing.png"}, 2)]
    with pytest.raises(InputError, match=r"2 bad inputs: input 0: .*outside.*; input 2: .*not found") as info:
        proc.check_inputs(bad)
    assert type(info.value) is InputError  # two kinds (PromptError, ImageError): the common base
    with pytest.raises(PromptError, match="^query: "):
        proc.check_inputs(bad[:1], names=["query"])
    with pytest.raises(ImageError, match="aspect ratio"):
        proc.check_inputs([parse_input(Image.new("RGB", (5800, 28)))])  # 207:1, no enlargement


def test_batches_group_images_and_sort_texts(tiny_model):
    proc = tiny_model.processor
    small, large = Image.new("RGB", (64, 48)), Image.new("RGB", (640, 480))
    items = proc.check_inputs([parse_input(x) for x in
                               ["a b c d e f", {"image": small, "text": "x"}, "a", {"image": large, "text": "y"},
                                {"image": small, "text": "z"}, "a b c"]])
    batches = list(proc.plan_batches(items, 2))
    assert batches == [[0, 5], [2], [3, 1], [4]]  # texts longest first; the large image first, small's rows together


def test_processor_copies_and_pickles_with_a_lock_of_their_own(tiny_model):
    proc = tiny_model.processor
    for other in (copy.deepcopy(proc), pickle.loads(pickle.dumps(proc))):
        assert other._tokenizer_lock is not proc._tokenizer_lock
        assert other.token_ids("a rocket") == proc.token_ids("a rocket")
