"""A plain folder of images as data: recursive listing by extension, corrupt files skipped and counted,
non-square photos centre-cropped for eval and cut into random crops for training, clear errors."""

import logging

import numpy as np
import pytest
from PIL import Image

from mllm.data.arrays import load_image_arrays, load_photos
from mllm.data.image_folder import (
    ACCEPTED,
    is_image_folder,
    list_images,
    read_image_folder,
    record_key,
)
from mllm.data.shards import DataStats, write_shards
from training.data import CropSampler, random_crops


def _save(path, size=(40, 30), colour=(200, 30, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


@pytest.fixture
def photos(tmp_path):
    """A nested folder: images of every accepted extension in mixed case, plus things that are not images."""
    root = tmp_path / "photos"
    _save(root / "a.png")
    _save(root / "B.JPG", fmt="JPEG")
    _save(root / "sub" / "c.jpeg", fmt="JPEG")
    _save(root / "sub" / "deeper" / "d.WebP", fmt="WEBP")
    _save(root / "sub" / "a.jpg", fmt="JPEG")  # same stem as a.png: its own key
    (root / "notes.txt").write_text("not an image")
    (root / "scan.tiff").write_bytes(b"II*\x00")  # a format outside the accepted extensions: not listed
    _save(root / ".hidden" / "e.png")  # hidden folder
    _save(root / "._a.png", fmt="PNG")  # macOS AppleDouble file
    return root


def test_listing_is_recursive_sorted_case_insensitive_and_skips_hidden(photos):
    names = [path.relative_to(photos).as_posix() for path in list_images(photos)]
    assert names == ["B.JPG", "a.png", "sub/a.jpg", "sub/c.jpeg", "sub/deeper/d.WebP"]
    assert is_image_folder(photos)


def test_records_have_unique_safe_keys_and_the_relative_path(photos):
    stats = DataStats()
    records = list(read_image_folder(photos, stats))
    assert [r["key"] for r in records] == ["B_JPG", "a_png", "sub/a_jpg", "sub/c_jpeg", "sub/deeper/d_WebP"]
    assert [r["json"] for r in records][-1] == {"path": "sub/deeper/d.WebP"}
    assert all(r["image"].mode == "RGB" and r["image"].size == (40, 30) for r in records)
    assert stats.records == 5 and not stats.skipped
    taken = {"x_png"}
    assert record_key("x.png", taken) == "x_png-2"
    assert record_key("x png", taken) == "x_png-3"  # a space becomes `_` too, and the key stays unique
    assert record_key("_y.png", taken) == "i_y_png"


def test_corrupt_files_are_skipped_counted_and_named_in_one_warning(photos, caplog):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "empty.png").write_bytes(b"")
    good = (photos / "a.png").read_bytes()
    (photos / "sub" / "truncated.png").write_bytes(good[: len(good) // 2])
    (photos / "sub" / "zz.webp").write_bytes(b"RIFF0000WEBPVP8 garbage")
    stats = DataStats()
    with caplog.at_level(logging.WARNING, logger="mllm.data.image_folder"):
        records = list(read_image_folder(photos, stats))
    assert len(records) == 5
    assert stats.skipped == {"corrupt_image": 4}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0] == f"skipped 4 unreadable image files in {photos}: broken.jpg, empty.png, sub/truncated.png, ..."

    arrays = load_image_arrays(str(photos), 16, progress=False)  # the same files through the eval reader
    assert arrays.images.shape == (5, 16, 16, 3) and arrays.stats.skipped == {"corrupt_image": 4}


def test_non_square_photos_are_centre_cropped_after_the_short_side_is_resized(tmp_path):
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:40] = (0, 255, 0)
    wide[:, 40:] = (0, 0, 255)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(np.ascontiguousarray(wide.transpose(1, 0, 2))).save(tmp_path / "tall.png")
    arrays = load_image_arrays(str(tmp_path), 10, progress=False)
    assert arrays.images.shape == (2, 10, 10, 3)
    # 60x20 -> 30x10; the centre 10x10 is the green third, away from the bicubic seams.
    for image in arrays.images:
        assert np.abs(image[2:-2, 2:-2].astype(int) - (0, 255, 0)).max() <= 2


def test_empty_or_imageless_folders_are_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as error:
        list_images(empty)
    message = str(error.value)
    assert str(empty) in message and ACCEPTED == ".jpg/.jpeg/.png/.webp" and ACCEPTED in message
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="holds no images"):
        load_image_arrays(str(tmp_path / "docs"), 16, progress=False)
    with pytest.raises(ValueError, match="holds no images"):
        load_photos(tmp_path / "docs", 16, 64, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "nowhere")


def test_a_folder_of_shards_is_not_an_image_folder(tmp_path):
    write_shards([{"key": "k0", "image": Image.new("RGB", (8, 8)), "caption": "x"}], tmp_path / "shards",
                 progress=False)
    assert not is_image_folder(tmp_path / "shards")
    assert not is_image_folder(tmp_path / "nowhere")


def test_photos_are_held_with_a_capped_short_side_and_cut_into_random_crops(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    _save(tmp_path / "small.png", size=(12, 8), colour=(10, 200, 10))
    photos = load_photos(tmp_path, 16, 64, progress=False)
    shapes = sorted(image.shape for image in photos.images)
    assert shapes == [(16, 24, 3), (64, 107, 3)]  # the small one enlarged to the image size, the big one capped

    crops = random_crops(photos.images, 64, 16, np.random.default_rng(1))
    assert crops.shape == (64, 16, 16, 3) and crops.dtype == np.uint8
    # Scale jitter: crops of the big photo differ from each other (different places and sizes).
    textured = [crop for crop in crops if crop.std(axis=(0, 1)).max() > 5]
    assert len(textured) > 10 and len({crop.tobytes() for crop in textured}) == len(textured)
    again = random_crops(photos.images, 64, 16, np.random.default_rng(1))
    assert np.array_equal(crops, again)


def test_crop_sampler_resumes_from_its_state(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 90, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    photos = load_photos(tmp_path, 16, 64, progress=False)
    straight = CropSampler(photos, 4, 16, seed=3)
    batches = [straight.next_batch() for _ in range(3)]
    resumed = CropSampler(photos, 4, 16, seed=3)
    resumed.load_state({"batches": 2})
    assert np.array_equal(resumed.next_batch(), batches[2])
    assert not np.array_equal(batches[0], batches[1])
    other_rank = CropSampler(photos, 4, 16, seed=3, rank=1)
    assert not np.array_equal(other_rank.next_batch(), batches[0])
