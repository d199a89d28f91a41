"""ditjax: pretraining Diffusion Transformers (DiT, SiT, DiT-MoE) in JAX/Flax at scale."""
from setuptools import find_packages, setup

setup(
    name="ditjax",
    version="0.1.0",
    description="JAX/Flax framework for pretraining Diffusion Transformers on TPU pods and GPU clusters",
    packages=find_packages(include=["ditjax", "ditjax.*", "pallas_kernels", "pallas_kernels.*"]),
    python_requires=">=3.12",
    install_requires=[
        "jax==0.12.0.1",
        "flax==0.12.12",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "tensorflow-datasets==4.9.10",
        "array-record==0.8.6",
        "ml-collections==1.1.0",
        "absl-py",
        "numpy",
        "einops==0.8.2",
        "chex==0.1.92",
        "safetensors==0.8.0",
        "tensorboardX==2.6.5",
        "matplotlib==3.11.2",
        "pillow",
        "psutil",
        "mlxtend==0.25.0",
        "scikit-learn==1.9.1",
    ],
    extras_require={"test": ["pytest==9.2.0", "pytest-xdist==3.8.0"]},
)
