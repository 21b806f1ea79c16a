"""Installable package for megatron-rwkvx.

`kernels/` is installed as `megatron_rwkvx.kernels` so that no generic top-level `kernels`
package lands in site-packages.
"""
from setuptools import Extension, find_packages, setup

_kernel_subpackages = ["megatron_rwkvx.kernels"] + [
    "megatron_rwkvx.kernels." + p for p in find_packages("kernels")
]

setup(
    name="megatron-rwkvx",
    version="0.1.0",
    description="Megatron-core based distributed pretraining for RWKV-X hybrid language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_rwkvx", "megatron_rwkvx.*"]) + _kernel_subpackages,
    package_dir={"megatron_rwkvx.kernels": "kernels"},
    package_data={"megatron_rwkvx": ["py.typed"]},
    # The RWKV World tokenizer's trie in C (34x the reference in tokens/s); optional: a build
    # failure leaves the exact pure-Python fallback.
    ext_modules=[
        Extension(
            "megatron_rwkvx.data._rwkv_trie",
            ["megatron_rwkvx/data/_rwkv_trie.c"],
            optional=True,
        )
    ],
    install_requires=[
        # torch is deliberately unpinned here: GPU images bring their own CUDA build.
        "torch>=2.4",
        "megatron-core==0.16.1",
        "numpy",
        "psutil",
        "packaging",
        "sentencepiece",
        "tensorboard",
        "datasets",
    ],
    extras_require={
        "gpu": ["triton>=3.0"],
        "reference": ["rwkv>=0.8.28"],
        # lm-eval's registry API (register_model, create_from_arg_obj) as used by the adapter.
        "eval": ["lm-eval>=0.4.9,<0.5"],
        # The retrieval study's figure (tools/retrieval_study.py).
        "study": ["matplotlib>=3.7"],
        "wandb": ["wandb>=0.17"],
        "test": ["pytest>=8", "rwkv>=0.8.28", "triton>=3.0", "lm-eval>=0.4.9,<0.5", "matplotlib>=3.7", "wandb>=0.17",
                 "nltk>=3.8", "tokenizers>=0.15"],
    },
    entry_points={
        "console_scripts": [
            "rwkvx-pretrain=megatron_rwkvx.pretrain:main",
            "rwkvx-lm-eval=megatron_rwkvx.evaluation.lm_eval_cli:main",
        ],
    },
)
