"""Input images: modes, sizes and bad files."""

import numpy as np
import pytest
import torch
from PIL import Image

from nti_lightning.data.images import ImageError, open_image, prepare


def test_rgba_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    image.putpixel((5, 5), (0, 0, 255, 255))
    image.save(tmp_path / "a.png")
    rgb = open_image(tmp_path / "a.png")
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((5, 5)) == (0, 0, 255)


def test_grayscale_and_16_bit(tmp_path):
    Image.new("L", (8, 8), 128).save(tmp_path / "gray.png")
    assert open_image(tmp_path / "gray.png").getpixel((0, 0)) == (128, 128, 128)
    data = np.full((8, 8), 51400, dtype=np.uint16)  # 51400 / 65535 * 255 = 200
    Image.fromarray(data).save(tmp_path / "deep.png")
    reopened = Image.open(tmp_path / "deep.png")
    assert reopened.mode.startswith("I")  # really stored as 16-bit
    assert open_image(tmp_path / "deep.png").getpixel((0, 0)) == (200, 200, 200)


def test_non_square_is_center_cropped_and_resized(tmp_path):
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    image.paste((255, 255, 255), (10, 0, 20, 10))  # the white centre square survives the crop
    pixels = prepare(image, 16)
    assert pixels.shape == (3, 16, 16)
    assert torch.allclose(pixels, torch.ones_like(pixels), atol=1e-2)
    assert float(pixels.min()) >= -1 and float(pixels.max()) <= 1


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(ImageError, match="nothere.png: image file not found"):
        open_image(tmp_path / "nothere.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageError, match="broken.jpg: not a readable image"):
        open_image(tmp_path / "broken.jpg")
    good = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    good.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageError, match="cut.png"):
        open_image(good)
