"""llava_jax: LLaVA (visual instruction tuning) in JAX/Flax for TPU and GPU."""
from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.7",
    "flax>=0.11",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "etils[epath]",  # workdirs on local disks and gs:// / s3:// alike
    "grain>=0.2.12",
    "ml_collections>=1.0",
    "absl-py",
    "transformers>=4.50",
    "tokenizers",
    "sentencepiece",
    "safetensors>=0.4",
    "pillow>=10",
    "numpy",
    "tqdm",
    "tensorboardX",  # TensorBoard event files without TensorFlow
    "matplotlib",    # the loss-curve PNG
    "fastapi",       # --mode=serve: OpenAI-compatible server and chat page
    "uvicorn",
]

EXTRAS = {
    # Test oracle and fixtures. torch is pinned to the CPU wheel; the runtime never imports it.
    "dev": [
        "pytest>=8",
        "pytest-xdist",
        "torch==2.13.0",
        "peft",          # the LoRA oracle (PeftModel); resolves with the pinned torch 2.13.0 CPU wheel
        "accelerate",
        "bitsandbytes",  # the NF4 oracle (quantize_4bit / dequantize_4bit run on CPU); installed with --no-deps
        "scikit-image",
        "selenium",      # drives the system Chromium for the chat-page test
        "nbformat",      # the notebooks are executed top to bottom by the tests
        "nbclient",
        "ipykernel",
        # the TFDS source is tested for real: reading needs tensorflow-datasets + array_record,
        # preparing the tiny test data set needs tensorflow-cpu
        "tensorflow-datasets",
        "array_record",
        "tensorflow-cpu",
        # the real TPU compiler without TPUs (--mode=plan on TPU topologies, tests/scale), pinned as jax[tpu] 0.10.2
        # pins it. After upgrading jax, its pin is in jax's metadata: python -c "import importlib.metadata as m;
        # print([r for r in m.requires('jax') if 'libtpu' in r])"
        "libtpu==0.0.42.*",
    ],
    "gcs": ["gcsfs"],  # gs:// workdirs through etils.epath's fsspec backend (without TensorFlow)
    "torch": ["torch==2.13.0"],  # only to read legacy pickle `.bin` checkpoints
    "tfds": ["tensorflow-datasets", "array_record"],          # read prepared array_record data sets
    "tfds-prepare": ["tensorflow-datasets", "array_record", "tensorflow-cpu"],  # prepare them
}

setup(
    name="llava_jax",
    version="0.1.0",
    description="LLaVA (visual instruction tuning) in JAX/Flax: CLIP ViT-L/14 + projector + LLaMA, sharded with jit.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["llava_jax", "llava_jax.*"]),
    package_data={"llava_jax.infer": ["static/*.html"]},
    python_requires=">=3.11",  # jax 0.10, jaxlib, flax 0.12, orbax-checkpoint, grain, libtpu: Requires-Python >=3.11
    install_requires=RUNTIME,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
