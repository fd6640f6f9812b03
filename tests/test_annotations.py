"""severstal.data.annotations: both train.csv formats, submissions, writers, and the errors bad tables give."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from severstal.data.annotations import (
    list_images,
    read_annotations,
    read_submission,
    read_train_csv,
    write_submission,
)
from severstal.files import write_text_atomic


@pytest.fixture(scope="module")
def later(real_data):
    return read_annotations(real_data / "train_partial_newformat.csv")


def test_later_format_reads_one_sorted_row_per_real_mask(later):
    frame = later.frame
    assert list(frame.columns) == ["ImageId", "ClassId", "EncodedPixels"]
    assert len(frame) == 4908 and len(later.image_ids) == 4479
    # Per class counts from PROVENANCE.md.
    assert frame["ClassId"].value_counts().sort_index().tolist() == [630, 175, 3479, 624]
    assert frame["ClassId"].dtype == "int64"
    assert frame.equals(frame.sort_values(["ImageId", "ClassId"]).reset_index(drop=True))
    assert (frame["EncodedPixels"] != "").all()


def test_original_format_rebuilt_from_the_later_one_reads_to_the_same_frame(real_data, later, tmp_path):
    labels = pd.read_csv(real_data / "train_labels_per_image.csv")
    known = sorted(labels.loc[labels["rle_known"] == 1, "ImageId"])
    masks = dict(zip(zip(later.frame["ImageId"], later.frame["ClassId"]), later.frame["EncodedPixels"]))
    rows = [(f"{image_id}_{c}", masks.get((image_id, c), "")) for image_id in known for c in (1, 2, 3, 4)]
    path = tmp_path / "train_original.csv"
    pd.DataFrame(rows, columns=["ImageId_ClassId", "EncodedPixels"]).to_csv(path, index=False)
    assert len(rows) == 41524

    original = read_annotations(path)
    assert original.frame.equals(later.frame)
    # The original format also lists the defect-free images.
    assert original.image_ids == known and len(known) == 10381


def test_real_sample_submissions_parse(real_data):
    final = read_submission(real_data / "sample_submission.csv")
    assert len(final.image_ids) == 5506
    assert final.frame.empty  # ClassId 0 rows only list their images
    first = read_submission(real_data / "sample_submission_2019-07.csv")
    assert len(first.image_ids) == 1801 and len(first.frame) == 7204
    assert set(first.frame["EncodedPixels"]) == {"1 1"}
    with pytest.raises(ValueError, match=r"line 2 \(ImageId '0000f269f.jpg'\): class id '0' is not one of 1, 2, 3, 4"):
        read_train_csv(real_data / "sample_submission.csv")


BAD_TABLES = [
    ("ImageId,EncodedPixels\na.jpg,1 1\n",
     r"unknown header 'ImageId,EncodedPixels'; accepted headers are 'ImageId_ClassId,EncodedPixels' .* and "
     r"'ImageId,ClassId,EncodedPixels'"),
    ("", r"not a readable CSV table"),
    ("ImageId,ClassId,EncodedPixels\na.jpg,1,1 3\nb.jpg,5,1 3\n",
     r"line 3 \(ImageId 'b.jpg'\): class id '5' is not one of 1, 2, 3, 4"),
    ("ImageId,ClassId,EncodedPixels\na.jpg,x,1 3\n", r"line 2 \(ImageId 'a.jpg'\): class id 'x' is not one of"),
    ("ImageId,ClassId,EncodedPixels\n,1,1 3\n", r"line 2 \(ImageId ''\): the ImageId is empty"),
    ("ImageId,ClassId,EncodedPixels\na.jpg,1,1 3\n\nb.jpg,2,1 2 3\n",
     r"line 4 \(ImageId 'b.jpg'\): malformed EncodedPixels: odd number of values"),
    ("ImageId,ClassId,EncodedPixels\na.jpg,2,10 5 3 2\n",
     r"line 2 \(ImageId 'a.jpg'\): malformed EncodedPixels: starts not"),
    ("ImageId,ClassId,EncodedPixels\na.jpg,2,409600 5\n", r"line 2 .*runs past the end of the image"),
    ("ImageId,ClassId,EncodedPixels\na.jpg,2,1 x\n", r"line 2 .*value 'x' \(value 2\) is not an integer"),
    ("ImageId,ClassId,EncodedPixels\na.jpg,3,1 3\nb.jpg,1,1 1\na.jpg,3,9 3\n",
     r"line 4 \(ImageId 'a.jpg'\): class 3 of this image is already on line 2"),
    ("ImageId_ClassId,EncodedPixels\na.jpg_1,\na.jpg_7,\n", r"line 3 \(ImageId 'a.jpg'\): class id '7'"),
    ("ImageId_ClassId,EncodedPixels\na.jpg,1 1\n", r"line 2: 'a.jpg' is not ImageId_ClassId"),
    ("ImageId_ClassId,EncodedPixels\na.jpg_1,0 4\n", r"line 2 \(ImageId 'a.jpg'\): malformed EncodedPixels: start 0"),
    ("ImageId,ClassId,EncodedPixels\na.jpg,1,1 3,extra\n", r"not a readable CSV table: Length of header"),
    ("ImageId,ClassId,EncodedPixels\na.jpg,1,1 3\nb.jpg,1,1 3,extra\n", r"not a readable CSV table: .*line 3, saw 4"),
]


@pytest.mark.parametrize("text, message", BAD_TABLES)
def test_malformed_tables_raise_errors_naming_file_line_and_image(tmp_path, text, message):
    path = tmp_path / "train.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as caught:
        read_train_csv(path)
    assert str(path) in str(caught.value)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation table not found"):
        read_train_csv(tmp_path / "absent.csv")


def test_columns_in_any_order_blank_rle_rows_and_blank_lines(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("EncodedPixels,ClassId,ImageId\n1 3,2,b.jpg\n,1,c.jpg\n\n5 2,1,a.jpg\n")
    annotations = read_annotations(path)
    assert annotations.frame.values.tolist() == [["a.jpg", 1, "5 2"], ["b.jpg", 2, "1 3"]]
    assert annotations.image_ids == ["a.jpg", "b.jpg", "c.jpg"]


@pytest.mark.parametrize(
    "fmt, header", [("new", "ImageId,EncodedPixels,ClassId"), ("old", "ImageId_ClassId,EncodedPixels")]
)
def test_write_submission_writes_every_pair_and_reads_back(tmp_path, fmt, header):
    frame = pd.DataFrame({"ImageId": ["b.jpg", "a.jpg"], "ClassId": [3, 1], "EncodedPixels": ["1 5", "7 2 20 1"]})
    path = tmp_path / "out" / "submission.csv"
    assert write_submission(frame, path, ["a.jpg", "b.jpg", "c.jpg"], fmt=fmt) == path
    lines = path.read_text().splitlines()
    assert lines[0] == header and len(lines) == 1 + 3 * 4
    if fmt == "new":
        assert lines[1:5] == ["a.jpg,7 2 20 1,1", "a.jpg,,2", "a.jpg,,3", "a.jpg,,4"]
    else:
        assert lines[1:5] == ["a.jpg_1,7 2 20 1", "a.jpg_2,", "a.jpg_3,", "a.jpg_4,"]
    back = read_submission(path)
    assert back.image_ids == ["a.jpg", "b.jpg", "c.jpg"]
    assert back.frame.equals(read_train_csv(path))
    assert back.frame.values.tolist() == [["a.jpg", 1, "7 2 20 1"], ["b.jpg", 3, "1 5"]]
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]  # no temporary file left


def test_write_submission_rejects_bad_input(tmp_path):
    frame = pd.DataFrame({"ImageId": ["a.jpg"], "ClassId": [1], "EncodedPixels": ["1 5"]})
    path = tmp_path / "s.csv"
    with pytest.raises(ValueError, match=r"unknown submission format 'csv': choose one of \['new', 'old'\]"):
        write_submission(frame, path, ["a.jpg"], fmt="csv")
    with pytest.raises(ValueError, match="not in image_ids"):
        write_submission(frame, path, ["b.jpg"])
    with pytest.raises(ValueError, match=r"class id\(s\) \[5\]"):
        write_submission(frame.assign(ClassId=5), path, ["a.jpg"])
    with pytest.raises(ValueError, match="more than one mask"):
        write_submission(pd.concat([frame, frame]), path, ["a.jpg"])
    with pytest.raises(ValueError, match="malformed EncodedPixels: odd number"):
        write_submission(frame.assign(EncodedPixels="1 5 7"), path, ["a.jpg"])
    with pytest.raises(ValueError, match="lacks column"):
        write_submission(frame.drop(columns="ClassId"), path, ["a.jpg"])
    assert not path.exists()


def test_write_text_atomic_replaces_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a.txt"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_list_images(real_data, tmp_path):
    names = list_images(real_data / "train_images")
    assert len(names) == 106 and names == sorted(names) and all(n.endswith(".jpg") for n in names)
    (tmp_path / "b.PNG").touch()
    (tmp_path / "a.jpeg").touch()
    (tmp_path / "notes.txt").touch()
    assert list_images(tmp_path) == ["a.jpeg", "b.PNG"]
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        list_images(Path(tmp_path) / "absent")
