"""Bounds of every search request, from the CLI, the Python API or the HTTP API (torch-free, so the CLI's
parser can use them before anything heavy is imported). Beam search's memory and time grow with beam size x
length, and captions stop improving long before these."""

MAX_BEAM_SIZE = 10
MAX_LENGTH = 60  # words per caption
MAX_LENGTH_PENALTY = 5.0
