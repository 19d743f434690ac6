import re
from pathlib import Path

from setuptools import find_packages, setup


def version():
    """`__version__` from llama/__init__.py, read as text: importing the package needs torch."""
    text = Path(__file__).with_name("llama").joinpath("__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def requirements():
    return [line.strip() for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


setup(
    name="llama",
    version=version(),
    description="Inference for Meta-format Llama checkpoints (Llama 2, Code Llama, Llama 3.x text), on CUDA or CPU, at any world size",
    packages=find_packages(include=["llama", "llama.*"]),
    python_requires=">=3.9",
    install_requires=requirements(),
    extras_require={
        "test": ["pytest>=7", "pexpect>=4.8", "transformers>=4.40", "hypothesis>=6"],
        # benchmarks/bench.py: the transformers comparison, memory sampling, --plot
        "bench": ["transformers>=4.45", "psutil", "matplotlib"],
    },
)
