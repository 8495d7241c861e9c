"""unified_seq: one encoder-decoder, one token space, four vision tasks."""

import setuptools

setuptools.setup(
    name="unified_seq",
    version="0.1.0",
    description="Pix2Seq v2 style multi-task vision as token sequences, in JAX/Flax.",
    packages=setuptools.find_packages(include=["unified_seq", "unified_seq.*"]),
    python_requires=">=3.11",
    # Ranges tested together on Python 3.11, CPU: jax 0.10.2, flax 0.12.8,
    # optax 0.2.8, orbax-checkpoint 0.12.8, tensorflow-cpu 2.21.0,
    # tensorflow-datasets 4.9.10, numpy 2.4.6.
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "tensorflow-cpu>=2.21,<2.22",
        "tensorflow-datasets>=4.9.10,<4.10",
        "ml_collections>=1.1,<1.2",
        "pycocotools>=2.0.10,<2.1",
        "clu>=0.0.12,<0.1",
        # clu's TensorBoard writer imports it; tensorflow-cpu no longer pulls it in.
        "tensorboard>=2.20,<2.22",
        "sentencepiece>=0.2,<0.3",
        "pillow>=11,<14",
        "numpy>=2.0,<2.5",
        # RLE ground-truth masks become polygons through cv2.findContours: a
        # border-following contour tracer is easy to get subtly wrong.
        "opencv-python-headless>=4.12,<6",
        # The reference BLEU and CIDEr scorers of the COCO caption benchmark.
        "pycocoevalcap>=1.2,<1.3",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            # Two test workers, one file each (--dist loadfile): CI's 2 cores are
            # otherwise half idle while one test traces, compiles or waits.
            "pytest-xdist>=3.8,<4",
            "ruff>=0.17,<0.18",
            # tests/test_launch.py runs launch/colab.ipynb in a python3 kernel.
            "nbclient>=0.11,<0.12",
            "nbformat>=5.11,<6",
            "ipykernel>=7.4,<8",
        ]
    },
)
