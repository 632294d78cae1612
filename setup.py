"""Attribute-based image retrieval by disentangled feature chunks (Hu et al., CVPR 2018)."""
import platform
import sys

from setuptools import Extension, find_packages, setup


def scan_extensions() -> list[Extension]:
    """The search core's fused scan (retrieval/_scan.c), once plain and, on x86-64, once per
    instruction-set level; retrieval/scan.py loads the widest this CPU runs. Optional: without a C
    compiler the install goes on and the core uses its numpy path."""
    def build(name: str, *flags: str) -> Extension:
        return Extension(name, ["retrieval/_scan.c"], depends=["retrieval/_scan_lanes.h", "retrieval/_scan_single.h"],
                         extra_compile_args=["-O3", *flags],
                         extra_link_args=["-pthread"], libraries=["m"], optional=True)

    if sys.platform == "win32":
        return []
    levels = [("retrieval._scan_v3", "-march=x86-64-v3"), ("retrieval._scan_v4", "-march=x86-64-v4")]
    return [build("retrieval._scan")] + ([build(*level) for level in levels]
                                         if platform.machine() in ("x86_64", "AMD64") else [])


setup(
    name="chunk-retrieval",
    version="0.1.0",
    description="Search an unlabelled image collection by one visual attribute at a time.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["disentangle*", "indexer*", "retrieval*", "api*"]),
    include_package_data=True,
    package_data={"api": ["static/*"]},  # the web page ships with the package
    install_requires=[
        # torch 2.14.1 / torchvision 0.29.1 lie on the build machines' disk; keep them admitted.
        "torch>=2.3,<=2.14.1",
        "torchvision>=0.18,<=0.29.1",
        "numpy>=1.24",
        "pillow>=10.0",
        "h5py>=3.8",
        "scipy>=1.10",
        "click>=8.1",
        "tqdm>=4.65",
        "faiss-cpu>=1.11",
        "sqlalchemy>=2.0",
        "flask>=3.0",
        "waitress>=3.0",
        "threadpoolctl>=3.1",
        "prometheus_client>=0.20",   # /metrics: the official Prometheus client
        "apispec>=6.0",              # the OpenAPI document, generated from the request schemas
        "marshmallow>=3.20",         # the request schemas that validate and document the API
        "requests>=2.28",            # retrieval.client, the Python client for notebooks
        "orjson>=3.9",               # the service's JSON: 10x the standard library's speed
    ],
    extras_require={
        "dev": ["pytest>=8", "hypothesis>=6.100", "schemathesis>=4.0,<5", "selenium>=4.20"],
        # past one machine (docs/scale.md): shards and encoding on Ray, metadata in PostgreSQL
        "cluster": ["ray[data]>=2.40", "psycopg[binary]>=3.1"],
    },
    ext_modules=scan_extensions(),
    entry_points={"console_scripts": ["retrieval=retrieval.cli:main"]},
)
