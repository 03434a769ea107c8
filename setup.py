from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="pydistill",
    version="0.1.0",
    description="Fast, memory-lean on-policy distillation and GRPO losses that never materialize full-vocabulary logits",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # kernels/ ships as pydistill.kernels: a top-level `kernels` would collide with Hugging Face's `kernels`.
    packages=find_packages(include=["pydistill", "pydistill.*"]) + ["pydistill.kernels"],
    package_dir={"pydistill": "pydistill", "pydistill.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy",
        # No upper pin: CUDA torch pins its own triton (2.13.0 -> 3.7.1) and pip must be free to take it.
        "triton>=3.2; platform_system == 'Linux'",
    ],
    extras_require={
        # trl: the range pydistill.integrations.trl is tested with (it refuses other versions at construction)
        "dev": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "trl>=1.16,<1.17"],
        "trl": ["trl>=1.16,<1.17", "transformers>=4.56", "accelerate>=1.4"],
        "train": ["transformers>=4.46", "accelerate>=1.0", "peft>=0.13", "safetensors", "gguf>=0.10",
                  "datasets>=3.0", "tqdm", "matplotlib", "pyyaml", "rich", "tensorboard"],
        "cuda": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["pydistill=pydistill.cli:main"]},
)
