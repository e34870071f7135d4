"""imcap: Show, Attend and Tell image captioning."""

__version__ = "0.1.0"


def load(run_dir, **kwargs):
    """Load a trained captioner from a run directory (or checkpoint directory); see imcap.api.Captioner."""
    from .api import Captioner

    return Captioner.load(run_dir, **kwargs)
