"""megatron-microep: per-micro-batch optimal expert load balancing for Megatron MoE training."""

from setuptools import find_packages, setup

setup(
    name="megatron-microep",
    version="0.1.0",
    description="MicroEP token scheduling, OR-Tools replica placement and FSEP for Megatron-core MoE",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_microep", "megatron_microep.*"]),
    include_package_data=True,
    package_data={"megatron_microep": ["data/*", "data/**/*"]},
    install_requires=[
        "numpy>=1.24",
        # The exact scheduler's max-flow core is compiled by numba: it sits on every MoE layer's critical path.
        "numba>=0.59",
        "ortools>=9.8",
        "pyyaml>=6.0",
        "torch>=2.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        # Supported and CI-tested: 0.16.1, 0.19.2, and 0.20.0 (Megatron-LM main; not on PyPI yet: CI puts
        # the checkout first on PYTHONPATH). 0.17+ declare Python>=3.12, so on 3.11 pip picks 0.16.x;
        # scripts/setup_env.sh shows how CI runs 0.19.2 on 3.11 (--no-deps).
        "megatron-core>=0.16,<0.21",
        # megatron-core's distributed checkpointing imports it but does not declare it.
        "psutil>=5.9",
        # The embedded run trains a byte-level BPE on the local stdlib corpus (no downloads).
        "tokenizers>=0.19",
    ],
    extras_require={
        # TransformerEngine and NVIDIA apex need CUDA; apex is NOT the PyPI package named "apex".
        "te": ["transformer-engine[pytorch]>=2.0"],
        "test": ["pytest>=7", "ruff==0.17.6"],  # ruff pinned: its formatting changes between releases
        # What Megatron-LM's training code (pretrain_gpt.py, megatron.training; core_r0.16 to main) imports
        # beyond megatron-core's own dependencies, as scripts/pretrain_gpt_microep.py runs it (found by
        # running it): six, regex, pydantic and triton (imported unconditionally), pybind11 (the dataset
        # index helpers are compiled on the first run), tensorboard (--tensorboard-dir), and transformers
        # (--tokenizer-type HuggingFaceTokenizer, the presets' tokenizer). Per job, not included: wandb
        # (--wandb-project), sentencepiece / tiktoken (their tokenizer types), TransformerEngine (extra te).
        "megatron-lm": ["six", "regex", "pydantic>=2", "triton", "pybind11", "tensorboard", "transformers"],
    },
    entry_points={"console_scripts": ["microep=megatron_microep.cli:main"]},
)
