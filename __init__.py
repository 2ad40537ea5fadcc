"""linrec: an inference server for linearized and recurrent LLMs.

Each request keeps one constant-size recurrent state in a slot pool instead of a KV cache.
"""

__version__ = "0.1.0"
