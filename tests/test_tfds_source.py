"""tfds `coco/2017` source, offline: tfds's own loading path with mocked records.

`tfds.testing.mock_data`'s random generator cannot build `coco/2017` records
(it draws a different length for each field of the `objects` sequence, and
encoding then fails), so the mock is given the records: hand-made examples,
encoded and decoded by the real `coco/2017` features, with the decoders that
`load_tfds` passes (the image stays JPEG bytes).
"""

import io

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from unified_seq.data import coco, tfds_source
from unified_seq.data.errors import DataError
from unified_seq.vocab import TokenSpace

K = 17
RECORDS = [
    {
        "image": np.full((48, 64, 3), 100, np.uint8),
        "image/filename": "000000000007.jpg",
        "image/id": 7,
        "objects": {
            "id": [70, 71, 72],
            "area": [300, 3072, 12],
            "bbox": np.array(
                [[0.125, 0.25, 0.5, 0.75], [0, 0, 1, 1], [0.5, 0.5, 0.625, 0.5625]], np.float32
            ),
            "label": [0, 79, 11],  # person, toothbrush, stop sign
            "is_crowd": [False, True, False],
        },
    },
    {
        "image": np.full((30, 20, 3), 50, np.uint8),
        "image/filename": "000000000009.jpg",
        "image/id": 9,
        "objects": {
            "id": [],
            "area": [],
            "bbox": np.zeros([0, 4], np.float32),
            "label": [],
            "is_crowd": [],
        },
    },
]


def _as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    """Stands in for the builder's record reader; records the call's arguments."""
    _as_dataset.calls.append({"split": split, "decoders": decoders, "shuffle": shuffle_files})
    features = self.info.features
    encoded = [features.encode_example(r) for r in RECORDS]
    signature = tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.dtype), features.get_serialized_info()
    )
    ds = tf.data.Dataset.from_generator(lambda: iter(encoded), output_signature=signature)
    return ds.map(lambda ex: features.decode_example(ex, decoders=decoders))


_as_dataset.calls = []


def _load(space, split="train"):
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=_as_dataset):
        ds, category_map = tfds_source.load_tfds(
            split, "/nonexistent/tfds", space, num_keypoints=K, shuffle_files=True
        )
        return list(ds.as_numpy_iterator()), ds.element_spec, category_map


@pytest.fixture(scope="module")
def loaded():
    return _load(TokenSpace(), split="train[0:50%]")


def test_layout_keys_dtypes_and_shapes(loaded):
    examples, spec, _ = loaded
    call = _as_dataset.calls[0]
    assert call["split"] == "train[0:50%]" and call["shuffle"]
    assert isinstance(call["decoders"]["image"], tfds.decode.SkipDecoding)
    first, empty = examples
    assert first["image/id"] == 7 and first["image/filename"] == b""
    assert first["image/encoded"][:2] == b"\xff\xd8"  # still JPEG bytes
    np.testing.assert_array_equal(first["image/size"], [48, 64])
    assert first["image/size"].dtype == np.int32
    np.testing.assert_array_equal(first["objects/id"], [70, 71, 72])
    np.testing.assert_array_equal(first["objects/is_crowd"], [False, True, False])
    np.testing.assert_array_equal(first["objects/area"], [300, 3072, 12])
    assert first["objects/area"].dtype == np.float32
    assert first["objects/keypoints"].shape == (3, K, 3) and not first["objects/keypoints"].any()
    assert first["objects/polygons"].shape[0] == 3
    assert all(len(p) == 0 for p in first["objects/polygons"])
    assert first["captions"].shape == (0,)
    assert empty["objects/bbox"].shape == (0, 4) and empty["objects/keypoints"].shape == (0, K, 3)
    np.testing.assert_array_equal(empty["image/size"], [30, 20])
    assert spec["objects/polygons"] == tf.RaggedTensorSpec([None, None, 2], tf.float32, 1)


def test_boxes_are_pixels_and_labels_are_coco_ids(loaded):
    examples, _, category_map = loaded
    first = examples[0]
    size = np.array([48, 64, 48, 64], np.float32)
    np.testing.assert_allclose(first["objects/bbox"], RECORDS[0]["objects"]["bbox"] * size)
    np.testing.assert_allclose(first["objects/bbox"][0], [6, 16, 24, 48])
    assert not category_map.remapped
    np.testing.assert_array_equal(first["objects/class"], [1, 90, 13])
    assert first["objects/class"].dtype == np.int32


def test_spec_matches_the_json_source(loaded):
    _, spec, _ = loaded
    assert spec == coco.examples_to_dataset([], K).element_spec


def test_small_token_space_remaps_to_label_order():
    space = TokenSpace(coord_shift=185, bins=64, text_shift=249, text_vocab_size=64)
    assert space.max_class_id == 84  # room for 80 classes, not for id 90
    examples, _, category_map = _load(space)
    assert category_map.remapped and category_map.class_ids == tuple(range(1, 81))
    np.testing.assert_array_equal(examples[0]["objects/class"], [1, 80, 12])
    np.testing.assert_array_equal(category_map.to_dataset_id(np.array([1, 80, 12])), [1, 90, 13])


def test_coco_80_table():
    ids = [c["id"] for c in tfds_source.COCO_80_CATEGORIES]
    assert len(ids) == 80 and ids == sorted(ids) and ids[-1] == 90
    assert not {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(ids)  # COCO's unused ids
    assert tfds_source.COCO_80_CATEGORIES[0]["name"] == "person"


def test_tfds_to_example_eagerly_on_a_png():
    buffer = io.BytesIO()
    Image.new("RGB", (10, 6)).save(buffer, format="PNG")
    features = {
        "image": tf.constant(buffer.getvalue()),
        "image/filename": tf.constant("x.png"),
        "image/id": tf.constant(3, tf.int64),
        "objects": {
            "id": tf.constant([5], tf.int64),
            "area": tf.constant([4], tf.int64),
            "bbox": tf.constant([[0.5, 0.5, 1.0, 1.0]]),
            "label": tf.constant([2], tf.int64),
            "is_crowd": tf.constant([False]),
        },
    }
    category_map = tfds_source.CategoryMap.build(
        tfds_source.COCO_80_CATEGORIES, TokenSpace(), "test"
    )
    ex = tfds_source.tfds_to_example(features, category_map, K)
    np.testing.assert_array_equal(ex["image/size"], [6, 10])
    np.testing.assert_allclose(ex["objects/bbox"], [[3, 5, 6, 10]])
    np.testing.assert_array_equal(ex["objects/class"], [3])


def test_unprepared_data_dir_is_a_clear_error(tmp_path, monkeypatch):
    # Keeps tfds from asking GCS whether the data set is hosted there.
    monkeypatch.setattr(tfds.core.utils.gcs_utils, "exists", lambda path: False)
    with pytest.raises(DataError, match="tfds build coco/2017"):
        tfds_source.load_tfds("validation", str(tmp_path), TokenSpace())
