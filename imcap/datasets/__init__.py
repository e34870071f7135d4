"""Caption datasets: reading each format into one record type, and `prepare`: SOURCE -> DATA_DIR
(docs/formats.md). One module a concern, each readable on its own:

    records.py  ImageRecord (what every reader returns), DatasetError, the shared file helpers
    readers.py  read_karpathy, read_coco, read_flickr8k, read_flickr8k_cn, read_aic, read_lines
    formats.py  FORMATS: name -> reader, default language, where the caption file and images are
    prepare.py  prepare: read, check images (images.probe_image), tokenize, split, build the vocabulary
    commit.py   dataset.json, vocab.json and report.json replace a previous DATA_DIR's as one
    report.py   report.json, the summary the CLI prints, the images that cannot be opened
    load.py     reading a DATA_DIR back (load_dataset, load_vocab) and the rows of a split (split_rows)
"""

from ..images import probe_image
from .commit import COMMIT_DIR, OUTPUTS
from .formats import FORMATS, Format, caption_file, default_image_root, get_format, read_source
from .load import load_dataset, load_vocab, split_rows
from .prepare import assign_splits, prepare
from .readers import (AIC_SPLITS, FLICKR8K_CN_CAPTIONS, FLICKR8K_CN_SPLITS, FLICKR8K_SPLITS, FLICKR8K_TOKENS,
                      aic_files, halve, read_aic, read_coco, read_flickr8k, read_flickr8k_cn, read_karpathy,
                      read_lines)
from .records import DATASET_VERSION, SPLITS, DatasetError, ImageRecord, Problem, escapes_root
from .report import format_summary, image_failures

__all__ = [
    "AIC_SPLITS", "COMMIT_DIR", "DATASET_VERSION", "FLICKR8K_CN_CAPTIONS", "FLICKR8K_CN_SPLITS", "FLICKR8K_SPLITS",
    "FLICKR8K_TOKENS", "FORMATS", "OUTPUTS", "SPLITS", "DatasetError", "Format", "ImageRecord", "Problem",
    "aic_files", "assign_splits", "caption_file", "default_image_root", "escapes_root", "format_summary",
    "get_format", "halve", "image_failures", "load_dataset", "load_vocab", "prepare", "probe_image", "read_aic",
    "read_coco", "read_flickr8k", "read_flickr8k_cn", "read_karpathy", "read_lines", "read_source", "split_rows",
]
