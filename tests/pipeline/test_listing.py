import pytest

from pipeline.listing import InputNotFoundError, has_image_extension, list_images


def test_lists_images_of_any_letter_case_with_relative_keys(tmp_path):
    for name in ("a/x.JPG", "b/x.jpg", "c/d/y.TiFf", "notes.txt", "z.webp", ".hidden/k.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    rows = list(list_images(str(tmp_path), ("jpg", "tiff", "webp", "png"), {}))
    assert [row["source_key"] for row in rows] == [
        ".hidden/k.png",
        "a/x.JPG",
        "b/x.jpg",
        "c/d/y.TiFf",
        "z.webp",
    ]
    assert rows[1]["source_uri"] == str(tmp_path / "a/x.JPG")
    assert len({row["image_id"] for row in rows}) == 5


def test_limit_stops_the_listing(tmp_path):
    for index in range(5):
        (tmp_path / f"{index}.png").write_bytes(b"x")
    assert len(list(list_images(str(tmp_path), ("png",), {}, limit=2))) == 2


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputNotFoundError, match="not a folder"):
        list(list_images(str(tmp_path / "missing"), ("png",), {}))


def test_extension_needs_a_dot():
    assert has_image_extension("a/b.PNG", ["png"]) and not has_image_extension("a/png", ["png"])
