from pathlib import Path

from setuptools import find_packages, setup


def requirements():
    return [line.strip() for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


setup(
    name="llama",
    version="0.1.0",
    description="Inference for Meta-format Llama 2 checkpoints, on CUDA or CPU, at any world size",
    packages=find_packages(include=["llama", "llama.*"]),
    python_requires=">=3.9",
    install_requires=requirements(),
    extras_require={
        "test": ["pytest>=7", "pexpect>=4.8", "transformers>=4.40", "hypothesis>=6"],
        # benchmarks/bench.py: the transformers comparison, memory sampling, --plot
        "bench": ["transformers>=4.45", "psutil", "matplotlib"],
    },
)
