"""Installable package for the latent-diffusion training system (VA-VAE + LightningDiT).

Compatible ranges live here; the exact tested set is pinned in constraints.txt.
"""

from setuptools import find_packages, setup

setup(
    name="lightning-latent",
    version="0.1.0",
    description="Training system for VA-VAE and LightningDiT (arXiv 2501.01423) at scale",
    python_requires=">=3.10",
    packages=find_packages(
        include=[
            "core",
            "core.*",
            "models",
            "models.*",
            "data",
            "data.*",
            "launchers",
            "launchers.*",
            "tools",
            "tools.*",
        ]
    ),
    install_requires=[
        "torch>=2.11",
        "torchvision>=0.26",
        "numpy>=1.26,<2.2",
        "scipy>=1.11",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "pillow>=10.0",
        "timm>=1.0.12",
        "torchdiffeq>=0.2.4",
        "mosaicml-streaming>=0.11",
        "boto3>=1.28",  # S3 (data.remote, extraction's remote): streaming's S3 client
        "zstandard>=0.22",
        "wandb>=0.18",
        "submitit>=1.5",
        "torch-fidelity>=0.3",
        "deepspeed>=0.16",
        "psutil>=5.9",
        "opencv-python-headless>=4.9",  # cv2.resize: the official VA-VAE training resize (data/images.py)
    ],
    # albumentations: the official VA-VAE transform, checked against ours (tests/unit/test_vavae_preprocessing.py);
    # moto[server]: a real S3 HTTP endpoint on localhost for the object-store tests (tests/s3_utils.py)
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "albumentations>=1.4",
            "ruff>=0.15",
            "import-linter>=2.1",
            "moto[server]>=5.0",
        ]
    },
)
