"""Every data file goes through tf.io.gfile: a data set, tokenizer and ground truth in `ram://`.

TensorFlow's in-memory `ram://` file system stands in for `gs://`: anything
that bypasses tf.io.gfile (open, os.path, PIL or pycocotools reading a path)
fails on it. A static check finds such calls in the package's source.
"""

import ast
import os
import uuid

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from tests import coco_fixture
from unified_seq import coco_metrics, defaults, visualize, vocab
from unified_seq.data import inputs, pipeline, synthetic
from unified_seq.data.categories import CategoryMap
from unified_seq.tasks import build_tasks
from unified_seq.tasks.tokenizer import CaptionTokenizer

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "unified_seq")


def _ram_dir() -> str:
    """A fresh folder of the process-wide ram:// file system."""
    return f"ram://tests/{uuid.uuid4().hex}"


def _copy_tree(src: str, dst: str) -> None:
    for folder, _, names in tf.io.gfile.walk(src):
        rel = os.path.relpath(folder, src)
        target = dst if rel == "." else os.path.join(dst, rel)
        tf.io.gfile.makedirs(target)
        for name in names:
            tf.io.gfile.copy(os.path.join(folder, name), os.path.join(target, name))


def _config(coco_dir: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.vocab = defaults.vocab_config()
    config.vocab.update(coord_shift=200, bins=64, text_shift=264, text_vocab_size=256)
    config.data = defaults.data_config()
    config.data.update(source="coco_json", coco_dir=coco_dir, image_size=64)
    config.tasks = defaults.task_configs()
    return config


@pytest.fixture(scope="module")
def local_and_ram(tmp_path_factory):
    """The COCO fixture on local disk and a copy of it in ram://."""
    local = str(tmp_path_factory.mktemp("coco"))
    coco_fixture.write_fixture(local, "train")
    ram = _ram_dir()
    _copy_tree(local, ram)
    yield local, ram
    tf.io.gfile.rmtree(ram)


def _assert_same(a, b):
    if isinstance(a, tf.RaggedTensor):
        for x, y in zip(a.nested_row_lengths(), b.nested_row_lengths(), strict=True):
            np.testing.assert_array_equal(x, y)
        a, b = a.flat_values, b.flat_values
    np.testing.assert_array_equal(a.numpy(), b.numpy())  # NaN rows compare equal


def _eval_batches(config, data):
    task = build_tasks(config)["object_detection"]
    ds = pipeline.eval_dataset(task, data.examples, data, config, batch_size=8)
    return list(inputs.numpy_batches(ds, data))


def test_split_in_ram_loads_and_decodes_as_the_local_copy(local_and_ram, tmp_path, monkeypatch):
    local, ram = local_and_ram
    monkeypatch.setenv("UNIFIED_SEQ_CACHE", str(tmp_path / "cache"))
    loaded = {}
    for root in (local, ram):
        config = _config(root)
        space = vocab.TokenSpace.from_config(config.vocab)
        loaded[root] = (config, inputs.load_split(config, "train", space))
    (config, want), (ram_config, got) = loaded[local], loaded[ram]
    assert got.num_images == want.num_images == 4
    assert got.stats == want.stats
    assert got.category_map == want.category_map
    assert all(f.startswith(f"{ram}/train2017/") for f in got.image_files)
    assert [os.path.basename(f) for f in got.image_files] == [
        os.path.basename(f) for f in want.image_files
    ]
    for a, b in zip(want.examples, got.examples, strict=True):
        for key in a:
            if key != "image/filename":
                _assert_same(a[key], b[key])
    (want_batch,) = _eval_batches(config, want)
    (got_batch,) = _eval_batches(ram_config, got)
    assert got_batch["image"].shape == (4, 64, 64, 3)
    assert np.std(got_batch["image"]) > 0.05  # random pixels, not a blank canvas
    for key in want_batch:
        np.testing.assert_array_equal(got_batch[key], want_batch[key])


def test_tokenizer_cache_and_workdir_copy_in_ram(local_and_ram, monkeypatch):
    _, ram = local_and_ram
    cache, workdir = _ram_dir(), _ram_dir()
    monkeypatch.setenv("UNIFIED_SEQ_CACHE", cache)
    config = _config(ram)
    space = vocab.TokenSpace.from_config(config.vocab)
    data = inputs.load_split(config, "train", space, workdir=workdir)
    own = os.path.join(workdir, inputs.WORKDIR_TOKENIZER)
    assert data.tokenizer.path.startswith(f"{cache}/tokenizers/")
    assert tf.io.gfile.exists(own) and tf.io.gfile.exists(data.tokenizer.path)
    reloaded = CaptionTokenizer.load(own)
    text = "image 3 caption 1"
    assert reloaded.encode(text) == data.tokenizer.encode(text)
    assert reloaded.decode(reloaded.encode(text)) == text
    # A resumed run reads the workdir's copy, even with the cache gone.
    tf.io.gfile.rmtree(cache)
    again = inputs.load_tokenizer(config, space, workdir=workdir)
    assert again.path == own and again.vocab_size == data.tokenizer.vocab_size
    copy = os.path.join(workdir, "nested", "copy.model")
    reloaded.save(copy)
    assert CaptionTokenizer.load(copy).encode(text) == reloaded.encode(text)
    tf.io.gfile.rmtree(workdir)


def test_ground_truth_category_map_and_pictures_in_ram(local_and_ram):
    local, ram = local_and_ram
    truth = coco_metrics.GroundTruth(ram, "train", [1, 2, 3, 4])
    gt = truth.coco("instances")
    assert len(gt.getAnnIds()) == 6 and sorted(gt.getImgIds()) == [1, 2, 3, 4]
    assert len(truth.coco("person_keypoints").getAnnIds()) == 2
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in gt.dataset["annotations"]
        if not a["iscrowd"]
    ]
    assert coco_metrics.coco_ap(gt, results, "bbox", truth.image_ids)["AP"] == pytest.approx(1.0)

    out = _ram_dir()
    config = _config(local)
    space = vocab.TokenSpace.from_config(config.vocab)
    category_map = inputs.load_split(config, "train", space).category_map
    category_map.save(os.path.join(out, "run", "categories.json"))
    assert CategoryMap.load(os.path.join(out, "run", "categories.json")) == category_map
    picture = visualize.draw(np.zeros([8, 8, 3], np.float32), caption="x")
    visualize.save_png(picture, os.path.join(out, "preview", "a.png"))
    png = tf.io.decode_png(tf.io.read_file(os.path.join(out, "preview", "a.png")))
    assert png.shape[:2] == (8 + 14, 8)
    tf.io.gfile.rmtree(out)


def test_synthetic_set_is_generated_in_ram():
    target = os.path.join(_ram_dir(), "synthetic")
    cfg = {"dir": target, "seed": 0, "num_train": 2, "num_val": 1, "image_size": 64}
    assert synthetic.ensure_synthetic(cfg) == target
    assert synthetic.ensure_synthetic(cfg) == target  # complete: not generated again
    names = sorted(tf.io.gfile.listdir(os.path.dirname(target)))
    assert names == ["synthetic"]  # the scratch folder was renamed into place
    assert len(tf.io.gfile.listdir(os.path.join(target, "train2017"))) == 2
    tf.io.gfile.rmtree(os.path.dirname(target))


# --- static check ----------------------------------------------------------------------

# Calls that touch a path without tf.io.gfile (they fail on gs:// and ram://).
BANNED_CALLS = {
    "open", "io.open", "builtins.open",
    "os.makedirs", "os.mkdir", "os.listdir", "os.scandir", "os.walk", "os.stat", "os.lstat",
    "os.remove", "os.unlink", "os.rename", "os.replace", "os.rmdir", "os.removedirs",
    "glob.glob", "glob.iglob",
    "PIL.Image.open", "cv2.imread", "cv2.imwrite",
    "pycocotools.coco.COCO",  # COCO(path) opens the file; build it from a dict (coco_metrics)
}  # fmt: skip
BANNED_MODULES = ("shutil", "pathlib")
# os.path functions that only edit strings; every other one asks the local disk.
STRING_OS_PATH = {
    "join", "dirname", "basename", "split", "splitext", "normpath", "expanduser", "isabs",
    "commonprefix",
}  # fmt: skip
# The modules under conversion are listed so the check is known to cover them.
MUST_COVER = ("main.py", "train.py", "evaluate.py", "checkpoint.py")


def _modules() -> list[str]:
    found = []
    for folder, _, names in os.walk(PACKAGE):
        found += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    return sorted(os.path.relpath(p, os.path.dirname(PACKAGE)) for p in found)


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name → dotted name it was imported as (`osp` → `os.path`, `COCO` → ...)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = alias.asname and alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return {k: v for k, v in names.items() if v}


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _banned(name: str, call: ast.Call) -> bool:
    if name == "pycocotools.coco.COCO":
        return bool(call.args or call.keywords)  # COCO() then .dataset = ... is the way
    if name == "PIL.Image.open" and call.args and isinstance(call.args[0], ast.Call):
        # Bytes already read through tf.io.gfile, opened from memory.
        return _dotted(call.args[0].func) not in ("io.BytesIO", "BytesIO")
    if name in BANNED_CALLS or name.split(".")[0] in BANNED_MODULES:
        return True
    head, _, leaf = name.rpartition(".")
    return head == "os.path" and leaf not in STRING_OS_PATH


def path_calls_outside_gfile(path: str) -> list[str]:
    """`file:line: call` for each call in the module that reads or writes a path itself."""
    with open(path, encoding="utf-8") as f:  # the test reads the package's own source
        tree = ast.parse(f.read(), path)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name is None:
            continue
        head, _, rest = name.partition(".")
        resolved = aliases.get(head, head) + (f".{rest}" if rest else "")
        if _banned(resolved, node):
            found.append(f"{path}:{node.lineno}: {ast.unparse(node.func)}(...)")
    return found


def test_static_check_covers_the_modules_under_conversion(tmp_path):
    modules = _modules()
    assert {os.path.join("unified_seq", m) for m in MUST_COVER} <= set(modules)
    sample = (
        "import os, shutil\nimport os.path as osp\nfrom os.path import exists\n"
        "from pycocotools.coco import COCO\nfrom PIL import Image\n"
        "open('a')\nosp.isdir('b')\nexists('c')\nshutil.rmtree('d')\nCOCO('e')\n"
        "Image.open('f')\nos.path.join('g', 'h')\nCOCO()\nos.path.getsize('i')\n"
        "import io\nImage.open(io.BytesIO(b''))\n"
    )
    probe = tmp_path / "probe.py"
    probe.write_text(sample)
    lines = [int(hit.split(":")[1]) for hit in path_calls_outside_gfile(str(probe))]
    assert lines == [6, 7, 8, 9, 10, 11, 14]


@pytest.mark.parametrize("module", _modules())
def test_no_path_access_outside_gfile(module):
    hits = path_calls_outside_gfile(os.path.join(os.path.dirname(PACKAGE), module))
    assert not hits, "read or write paths through tf.io.gfile:\n" + "\n".join(hits)
