"""Exported samplers run in a process with only jax and numpy, and answer as the live Predictor."""

import json
import os
import subprocess
import sys
import textwrap
import uuid

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from unified_seq import defaults, evaluate, export, train, vocab
from unified_seq.data import inputs, synthetic
from unified_seq.models import sizes
from unified_seq.predictor import Predictor, row_ids, sampling_seed, task_key
from unified_seq.tasks.tokenizer import CaptionTokenizer

TASKS = ("object_detection", "instance_segmentation", "captioning")
BATCH = 4
NUM_MASK_SAMPLES = 3
EOS_BIAS = 1.0

# Run in a fresh interpreter: the export's files and jax/numpy, nothing of unified_seq.
LOADER = textwrap.dedent(
    """
    import json, sys
    import jax
    import numpy as np

    out, inputs_path, outputs_path = sys.argv[1:]
    with open(f"{out}/manifest.json") as f:
        manifest = json.load(f)
    with np.load(f"{out}/{manifest['params']['file']}") as npz:
        params = [npz[name] for name in manifest["params"]["names"]]
    given = np.load(inputs_path)
    answers = {}
    for name, spec in manifest["tasks"].items():
        with open(f"{out}/{spec['file']}", "rb") as f:
            exp = jax.export.deserialize(bytearray(f.read()))
        got = exp.call(
            params, *(given[f"{name}.{arg}"] for arg in ("images", "prompts", "ids", "seed"))
        )
        answers.update({f"{name}.{k}": np.asarray(v) for k, v in got.items()})
    np.savez(outputs_path, **answers)
    assert "unified_seq" not in sys.modules and "tensorflow" not in sys.modules
    """
)


def _config(data_dir: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.vocab = defaults.vocab_config()
    config.vocab.update(coord_shift=200, bins=64, text_shift=264, text_vocab_size=128)
    config.data = defaults.data_config()
    config.data.update(source="coco_json", coco_dir=data_dir, image_size=64)
    all_tasks = defaults.task_configs()
    config.tasks = ml_collections.ConfigDict({t: all_tasks[t] for t in TASKS})
    config.tasks.object_detection.max_instances = 6
    config.tasks.instance_segmentation.update(max_points=12, num_samples=NUM_MASK_SAMPLES)
    config.tasks.captioning.update(max_len=16)
    config.model = sizes.model_config(
        "tiny", enc_depth=1, enc_width=32, enc_mlp_dim=64, enc_heads=2,
        dec_depth=1, dec_width=32, dec_mlp_dim=64, dec_heads=2, dropout=0.0,
    )  # fmt: skip
    config.eval = defaults.eval_config()
    config.eval.batch_size = BATCH
    config.mesh = defaults.mesh_config()
    config.sharding_rules = ".*=replicate"
    return config


def _seed(task) -> np.ndarray:
    return np.array([7, task.prompt_token], np.uint32)


def _live(predictor, task, batch):
    # The exported program's key: the seed's two words as threefry key data.
    key = jax.random.wrap_key_data(jnp.asarray(_seed(task)), impl="threefry2x32")
    return predictor.sample(task, batch, key)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny initialised model of three tasks, exported, and its answers live and loaded."""
    tmp = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNIFIED_SEQ_CACHE", str(tmp / "cache"))
        data_dir = synthetic.generate(
            str(tmp / "data"), seed=1, num_train=2, num_val=4, image_size=64
        )
        config = _config(data_dir)
        space = vocab.TokenSpace.from_config(config.vocab)
        data = inputs.load_split(config, "val", space)
    model = train.build_model(config, space)
    params = jax.jit(model.init)(
        jax.random.key(0), np.zeros([1, 64, 64, 3], np.float32), np.zeros([1, 4], np.int32)
    )["params"]
    # Untrained, the model would almost never end an answer: favour EOS so that
    # some rows end early and padding, `length` and `done` are compared too.
    params["decoder"]["output_bias"] = params["decoder"]["output_bias"].at[vocab.EOS].add(EOS_BIAS)
    predictor = Predictor(model, params, labels=data, config=config)

    given, live = {}, {}
    for name in TASKS:
        task = predictor.tasks[name]
        batch = next(evaluate.eval_batches(task, data, config, batch_size=BATCH))
        assert len(batch["image"]) == BATCH
        given[name] = batch
        live[name] = _live(predictor, task, batch)

    out = str(tmp / "exported")
    manifest = export.save_export(predictor, out, batch_size=BATCH)
    inputs_path, outputs_path = str(tmp / "inputs.npz"), str(tmp / "outputs.npz")
    np.savez(
        inputs_path,
        **{
            f"{name}.{arg}": value
            for name, batch in given.items()
            for arg, value in (
                ("images", np.asarray(batch["image"], np.float32)),
                ("prompts", np.asarray(batch["prompt"], np.int32)),
                ("ids", row_ids(batch)),
                ("seed", _seed(predictor.tasks[name])),
            )
        },
    )
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, out, inputs_path, outputs_path],
        cwd=str(tmp),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(outputs_path) as npz:
        loaded = {name: {} for name in TASKS}
        for key in npz.files:
            name, field = key.split(".")
            loaded[name][field] = npz[key]
    return {
        "predictor": predictor,
        "data": data,
        "given": given,
        "live": live,
        "loaded": loaded,
        "manifest": manifest,
        "out": out,
    }


@pytest.mark.parametrize("name", TASKS)
def test_loaded_program_answers_as_the_live_sampler(run, name):
    live, loaded = run["live"][name], run["loaded"][name]
    samples = NUM_MASK_SAMPLES if name == "instance_segmentation" else 1
    assert set(loaded) == set(live)
    assert loaded["tokens"].shape == (BATCH * samples, run["manifest"]["tasks"][name]["max_len"])
    np.testing.assert_array_equal(loaded["tokens"], live["tokens"])
    np.testing.assert_array_equal(loaded["length"], live["length"])
    np.testing.assert_array_equal(loaded["done"], live["done"])
    for field in set(live) - {"tokens", "length", "done"}:
        np.testing.assert_allclose(loaded[field], live[field], rtol=1e-5, atol=1e-6)
    if name == "object_detection":
        assert loaded["range_probs"].shape == (BATCH, loaded["tokens"].shape[1], 100)
    # Real answers, not padding: an untrained model still writes tokens.
    assert (loaded["tokens"][:, 0] != vocab.EOS).any()


def test_loaded_answers_end_at_different_steps(run):
    ended = 0
    for name in TASKS:
        out = run["loaded"][name]
        max_len = out["tokens"].shape[1]
        for tokens, length, done in zip(out["tokens"], out["length"], out["done"], strict=True):
            if done:
                assert tokens[length] == vocab.EOS and not tokens[length + 1 :].any()
            else:
                assert length == max_len
        ended += int(out["done"].sum())
    rows = sum(len(out["done"]) for out in run["loaded"].values())
    assert 0 < ended < rows


@pytest.mark.parametrize("name", TASKS)
def test_loaded_answers_obey_the_task_grammar(run, name):
    predictor = run["predictor"]
    grammar = predictor.tasks[name].answer_grammar(run["data"])
    tokens = run["loaded"][name]["tokens"]
    for row in tokens:
        assert grammar.violation(row) is None
    if name == "instance_segmentation":
        # The samples of one prompt draw with their own keys.
        per_prompt = tokens.reshape(BATCH, NUM_MASK_SAMPLES, -1)
        assert any(len({r.tobytes() for r in rows}) > 1 for rows in per_prompt)


def test_manifest_and_files_describe_the_programs(run):
    predictor, manifest, out = run["predictor"], run["manifest"], run["out"]
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f) == json.loads(json.dumps(manifest))
    leaves = jax.tree.leaves(predictor.variables)
    with np.load(os.path.join(out, "params.npz")) as npz:
        assert npz.files == manifest["params"]["names"] == [f"p{i:04d}" for i in range(len(leaves))]
        for name, leaf in zip(npz.files, leaves, strict=True):
            np.testing.assert_array_equal(npz[name], leaf)
    params_size = os.path.getsize(os.path.join(out, "params.npz"))
    cmap = run["data"].category_map
    assert [c["dataset_id"] for c in manifest["categories"]] == list(cmap.dataset_ids)
    assert [c["class_id"] for c in manifest["categories"]] == list(cmap.class_ids)
    assert [c["name"] for c in manifest["categories"]] == list(cmap.names)
    assert manifest["vocab"]["vocab_size"] == predictor.model.vocab_size == 392
    tokenizer = CaptionTokenizer.load(os.path.join(out, manifest["tokenizer"]))
    assert tokenizer.encode("a red circle") == run["data"].tokenizer.encode("a red circle")

    for name in TASKS:
        task, spec = predictor.tasks[name], manifest["tasks"][name]
        opts = predictor.sampler_options(task)
        samples = opts.num_samples
        assert (spec["batch_size"], spec["image_size"], spec["num_samples"]) == (BATCH, 64, samples)
        assert spec["prompt_token"] == vocab.TASK_PROMPTS[name]
        assert spec["prompt_length"] == run["given"][name]["prompt"].shape[1]
        inputs_by_name = {i["name"]: i for i in spec["inputs"]}
        assert inputs_by_name["params"]["leaves"] == len(leaves)
        assert inputs_by_name["images"]["shape"] == [BATCH, 64, 64, 3]
        assert inputs_by_name["seed"] == {"name": "seed", "shape": [2], "dtype": "uint32"}
        outputs = {o["name"]: o for o in spec["outputs"]}
        for field, value in run["loaded"][name].items():
            assert outputs[field]["shape"] == list(value.shape)
            assert outputs[field]["dtype"] == str(value.dtype)
        evaluation = jax.random.key_data(task_key(sampling_seed(predictor.config), task))
        assert spec["eval_seed"] == np.asarray(evaluation).tolist()
        # Weights are inputs, not constants: the program is much smaller than they are.
        assert manifest["files"][spec["file"]] == os.path.getsize(os.path.join(out, spec["file"]))
        assert manifest["files"][spec["file"]] < params_size / 2


def test_multi_platform_program_runs_here(run):
    predictor, given = run["predictor"], run["given"]["object_detection"]
    exp = export.export_task(predictor, "object_detection", BATCH, platforms=("cpu", "cuda", "tpu"))
    assert exp.platforms == ("cpu", "cuda", "tpu")
    exp = jax.export.deserialize(exp.serialize())
    got = exp.call(
        jax.tree.leaves(predictor.variables),
        np.asarray(given["image"], np.float32),
        np.asarray(given["prompt"], np.int32),
        row_ids(given),
        _seed(predictor.tasks["object_detection"]),
    )
    np.testing.assert_array_equal(got["tokens"], run["live"]["object_detection"]["tokens"])


def test_export_writes_through_gfile(run):
    # ram:// stands in for gs://: only tf.io.gfile reaches it.
    out = f"ram://tests/{uuid.uuid4().hex}"
    manifest = export.save_export(run["predictor"], out, ["object_detection"], batch_size=2)
    assert sorted(tf.io.gfile.listdir(out)) == [
        "manifest.json", "object_detection.jaxexport", "params.npz",
    ]  # fmt: skip
    assert manifest["tokenizer"] is None and list(manifest["tasks"]) == ["object_detection"]
    with tf.io.gfile.GFile(f"{out}/object_detection.jaxexport", "rb") as f:
        exp = jax.export.deserialize(bytearray(f.read()))
    assert exp.in_avals[-4].shape == (2, 64, 64, 3)
    tf.io.gfile.rmtree(out)


def test_unknown_task_is_named(run):
    with pytest.raises(ValueError, match="keypoint_detection.*captioning"):
        export.export_task(run["predictor"], "keypoint_detection", BATCH)
