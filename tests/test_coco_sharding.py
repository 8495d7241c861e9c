"""Per-process shares of a COCO-format split (`process_index`, `process_count`)."""

import json
import os

import ml_collections
import numpy as np
import pytest

from tests import coco_fixture
from unified_seq import defaults, vocab
from unified_seq.data import coco, inputs
from unified_seq.data.errors import DataError

SPACE = vocab.TokenSpace()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("coco"))
    coco_fixture.write_fixture(path, "train")
    return path


def _assert_same_examples(got, want):
    assert [int(ex["image/id"]) for ex in got] == [int(ex["image/id"]) for ex in want]
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key == "image/filename":  # the same file, maybe under another root
                assert os.path.basename(a[key]) == os.path.basename(b[key])
            elif key == "objects/polygons":
                for p, q in zip(a[key], b[key], strict=True):
                    np.testing.assert_array_equal(p, q)
            else:
                np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("count", [2, 3, 4, 5])
def test_shares_are_the_sorted_images_index_to_count(root, count):
    whole, category_map, stats = coco.load_coco_json(root, "train", SPACE)
    totals = dict.fromkeys(("images", "objects", "captions", "with_keypoints"), 0)
    for index in range(count):
        share, share_map, share_stats = coco.load_coco_json(
            root, "train", SPACE, process_index=index, process_count=count
        )
        _assert_same_examples(share, whole[index::count])
        assert share_map == category_map
        for key in totals:
            totals[key] += share_stats[key]
    assert totals == {key: stats[key] for key in totals}


def _rewrite(root, kind, edit):
    path = coco.annotation_path(root, kind, "train")
    with open(path) as f:
        content = json.load(f)
    content = edit(content)
    with open(path, "w") as f:
        json.dump(content, f)


def test_other_processes_annotations_are_dropped_unread(tmp_path):
    root = str(tmp_path)
    coco_fixture.write_fixture(root, "train")

    def break_image_2(content):
        for ann in content["annotations"]:
            if ann["image_id"] == 2:
                ann["bbox"] = "not a box"
        return content

    _rewrite(root, "instances", break_image_2)
    # Images 1, 2, 3, 4: process 1 of 2 holds 2 and 4; process 0 never parses image 2's.
    examples, _, _ = coco.load_coco_json(root, "train", SPACE, process_index=0, process_count=2)
    assert [int(ex["image/id"]) for ex in examples] == [1, 3]
    with pytest.raises(DataError, match="'bbox' must be 4 numbers"):
        coco.load_coco_json(root, "train", SPACE, process_index=1, process_count=2)


def test_files_listing_annotations_before_images_give_the_same_shares(root, tmp_path):
    other = str(tmp_path)
    coco_fixture.write_fixture(other, "train")
    for kind in coco.KINDS:
        _rewrite(
            other, kind, lambda c: {k: c[k] for k in sorted(c, key=lambda k: k != "annotations")}
        )
    for index in range(2):
        got, _, _ = coco.load_coco_json(other, "train", SPACE, process_index=index, process_count=2)
        want, _, _ = coco.load_coco_json(root, "train", SPACE, process_index=index, process_count=2)
        _assert_same_examples(got, want)


def test_image_lists_longer_than_the_first_read(root, monkeypatch):
    monkeypatch.setattr(coco, "_PREFIX_BYTES", 64)  # the file is read in growing pieces
    got, _, _ = coco.load_coco_json(root, "train", SPACE, process_index=1, process_count=3)
    assert [int(ex["image/id"]) for ex in got] == [2]


def test_images_listed_by_one_file_only_count_in_the_order(tmp_path):
    root = str(tmp_path)
    coco_fixture.write_fixture(root, "train")
    # Image 3 is listed by the captions file alone: the shares follow the union 1, 2, 3, 4.
    _rewrite(
        root,
        "instances",
        lambda c: {
            **c,
            "images": [i for i in c["images"] if i["id"] != 3],
            "annotations": [a for a in c["annotations"] if a["image_id"] != 3],
        },
    )
    _rewrite(
        root,
        "person_keypoints",
        lambda c: {
            **c,
            "images": [i for i in c["images"] if i["id"] != 3],
            "annotations": [a for a in c["annotations"] if a["image_id"] != 3],
        },
    )
    whole, _, _ = coco.load_coco_json(root, "train", SPACE)
    for index in range(2):
        share, _, _ = coco.load_coco_json(
            root, "train", SPACE, process_index=index, process_count=2
        )
        _assert_same_examples(share, whole[index::2])


def test_bad_process_index(root):
    with pytest.raises(ValueError, match="process_index=2"):
        coco.load_coco_json(root, "train", SPACE, process_index=2, process_count=2)


def test_load_split_shares_and_one_tokenizer_for_all(root, tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFIED_SEQ_CACHE", str(tmp_path / "cache"))
    config = ml_collections.ConfigDict()
    config.vocab = defaults.vocab_config()
    config.vocab.update(coord_shift=200, bins=64, text_shift=264, text_vocab_size=256)
    config.data = defaults.data_config()
    config.data.update(source="coco_json", coco_dir=root)
    space = vocab.TokenSpace.from_config(config.vocab)
    whole = inputs.load_split(config, "train", space)
    ids = {int(ex["image/id"]) for ex in whole.examples.as_numpy_iterator()}
    seen = set()
    for index in range(2):
        share = inputs.load_split(config, "train", space, process_index=index, process_count=2)
        share_ids = [int(ex["image/id"]) for ex in share.examples.as_numpy_iterator()]
        assert share_ids == sorted(ids)[index::2] and share.num_images == 2
        assert [os.path.basename(f) for f in share.image_files] == [
            f"{i:012d}.png" for i in share_ids
        ]
        assert share.tokenizer.path == whole.tokenizer.path  # trained on every caption
        seen.update(share_ids)
    assert seen == ids
