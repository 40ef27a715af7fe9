"""images.py: every way a row names an image → the image file's bytes, unreadable ones as counted drops
naming the entry, and stored bytes → the same image inputs the processor made."""
import io

import pytest
import torch
from PIL import Image

from orpo.data.images import decode_image, image_inputs, is_processor, read_image, text_tokenizer
from orpo.errors import UNREADABLE_IMAGE, DroppedPair
from tiny import chatml_tokenizer
from vision_models import llava_processor, random_image, write_image


def pixels(data: bytes):
    return decode_image(data).tobytes()


def test_every_way_to_name_an_image_gives_its_file_bytes(tmp_path):
    path = write_image(tmp_path / "pics" / "a.png")
    data = path.read_bytes()
    assert read_image("pics/a.png", tmp_path, "images[0]") == data  # relative to the data file's directory
    assert read_image(str(path), None, "images[0]") == data  # absolute
    assert read_image(data, None, "images[0]") == data
    assert read_image({"bytes": data, "path": None}, None, "images[0]") == data  # datasets' Image feature
    assert read_image({"bytes": None, "path": str(path)}, None, "images[0]") == data
    image = random_image(5, 7, seed=3)
    assert pixels(read_image(image, None, "images[0]")) == image.tobytes()  # a PIL image, stored as PNG


def test_a_missing_file_and_bytes_that_are_no_image_are_drops_naming_the_entry(tmp_path):
    with pytest.raises(DroppedPair) as missing:
        read_image("pics/none.jpg", tmp_path, "images[1]")
    assert (missing.value.reason, missing.value.detail) == (
        UNREADABLE_IMAGE, "images[1] 'pics/none.jpg': No such file or directory")
    with pytest.raises(DroppedPair) as garbage:
        read_image(b"not an image", None, "images[0]")
    assert garbage.value.reason == UNREADABLE_IMAGE
    assert garbage.value.detail.startswith("images[0]: not an image PIL can read")


def test_image_inputs_are_what_the_processor_makes():
    processor = llava_processor()
    image = random_image(20, 30, seed=1)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    got = image_inputs(processor, [buffer.getvalue()])
    made = processor(text=["<image>"], images=[image], return_tensors="pt")
    assert got.keys() == {"pixel_values"}
    assert torch.equal(got["pixel_values"], made["pixel_values"])


def test_a_processor_is_told_from_a_tokenizer():
    processor, tokenizer = llava_processor(), chatml_tokenizer()
    assert is_processor(processor) and not is_processor(tokenizer)
    assert text_tokenizer(processor) is processor.tokenizer and text_tokenizer(tokenizer) is tokenizer
    assert isinstance(decode_image(read_image(random_image(3, 3, 0), None, "x")), Image.Image)
