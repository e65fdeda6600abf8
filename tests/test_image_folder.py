"""An edge client's data folder: messy folders forgiven, wrong labels refused, every image mode converted."""

import io
import logging

import numpy as np
import pytest
from PIL import Image

from common.config import ConfigError
from common.image_folder import load_image_folder, to_mode
from tests.dataset_files import write_image_folder


def test_hidden_entries_empty_class_folders_and_unreadable_files_are_skipped_by_name(tmp_path, caplog):
    write_image_folder(tmp_path, ["3", "7"], per_class=2)
    (tmp_path / "5").mkdir()  # an empty class folder
    (tmp_path / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".ipynb_checkpoints" / "x.png")
    (tmp_path / "3" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "3" / "empty.png").write_bytes(b"")
    (tmp_path / "7" / "notes.txt").write_text("not an image")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, "JPEG")
    (tmp_path / "7" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])

    with caplog.at_level(logging.WARNING, logger="flwr"):
        data = load_image_folder(str(tmp_path), "digits")

    assert len(data) == 4 and sorted(data.labels.tolist()) == [3, 3, 7, 7]
    skipped = " ".join(r.getMessage() for r in caplog.records)
    for name in ("empty.png", "notes.txt", "truncated.jpg"):
        assert name in skipped
    assert ".DS_Store" not in skipped and "ipynb" not in skipped  # hidden: ignored, not warned about


def test_a_folder_without_a_usable_image_is_an_error_naming_it(tmp_path):
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ConfigError, match=f"data-dir '{tmp_path}' holds no usable image"):
        load_image_folder(str(tmp_path), "digits")


def test_labels_follow_folder_names_whatever_other_folders_exist(tmp_path):
    write_image_folder(tmp_path, ["ship"], per_class=2)
    data = load_image_folder(str(tmp_path), "cifar10")
    assert data.labels.tolist() == [8, 8]  # 'ship' is CIFAR-10 class 8 with no other folder present


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "CMYK", "1", "LA"])
@pytest.mark.parametrize("dataset, shape", [("digits", (1, 8, 8)), ("cifar10", (3, 32, 32))])
def test_every_image_mode_becomes_the_datasets_channels_and_size(tmp_path, mode, dataset, shape):
    (tmp_path / "1").mkdir()
    Image.new("RGB", (20, 14), (120, 60, 30)).convert(mode).save(tmp_path / "1" / ("a.tiff" if mode == "CMYK" else "a.png"))
    data = load_image_folder(str(tmp_path), dataset)
    assert data.images.shape == (1, *shape) and data.images.isfinite().all()


def test_16_bit_images_are_scaled_not_clipped():
    wide = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))  # mid-grey on 16 bits
    assert np.asarray(to_mode(wide, 1)).max() == 128


def test_transparent_pixels_become_white():
    clear = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert np.asarray(to_mode(clear, 3)).min() == 255
