import re
from pathlib import Path

from setuptools import Extension, find_packages, setup


def version():
    """`__version__` from llama/__init__.py, read as text: importing the package needs torch."""
    text = Path(__file__).with_name("llama").joinpath("__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def requirements():
    return [line.strip() for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


# The one-token decoding step in C for fp32 on the CPU (llama/native.py loads it
# with ctypes; it is no Python module). Optional: without a C compiler the
# install still succeeds and fp32 decodes with torch's kernels, saying so once.
# One build for every CPU of its architecture: no -march, the kernels of each
# x86-64 instruction set are compiled in and chosen when it loads (native.c).
# -fopenmp: it shares torch's OpenMP runtime (libgomp.so.1), loaded first.
native = Extension(
    "llama._native",
    sources=["llama/native.c"],
    depends=["llama/native_kernels.h"],
    extra_compile_args=["-O3", "-fopenmp", "-std=c11"],
    extra_link_args=["-fopenmp"],
    optional=True,
)


setup(
    name="llama",
    version=version(),
    description="Inference for Meta-format Llama checkpoints (Llama 2, Code Llama, Llama 3.x text), on CUDA or CPU, at any world size",
    packages=find_packages(include=["llama", "llama.*"]),
    ext_modules=[native],
    python_requires=">=3.9",
    install_requires=requirements(),
    extras_require={
        "test": ["pytest>=7", "pexpect>=4.8", "transformers>=4.40", "hypothesis>=6", "psutil", "numpy", "fire",
                 # tests/test_serve.py: the server's own extra, and the client it is tested with
                 "starlette>=0.37", "uvicorn>=0.30", "openai>=1.0"],
        # python -m llama.serve: an ASGI application (Starlette) and its server (uvicorn)
        "serve": ["starlette>=0.37", "uvicorn>=0.30"],
        # benchmarks/bench.py: the transformers comparison, memory sampling, --plot
        "bench": ["transformers>=4.45", "psutil", "matplotlib"],
    },
)
