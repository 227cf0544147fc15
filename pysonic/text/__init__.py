"""Text encoders behind one small interface (:class:`TextEncoder`): prompts -> (states, mask).

``T5TextEncoder`` (FLAN-T5 through ``transformers``, local directory only) is imported lazily so
``import pysonic.text`` does not need ``transformers``.
"""
from pysonic.text.base import TextEncoder

__all__ = ["TextEncoder", "T5TextEncoder"]


def __getattr__(name):
    if name == "T5TextEncoder":
        from pysonic.text.t5 import T5TextEncoder

        return T5TextEncoder
    raise AttributeError(f"module 'pysonic.text' has no attribute {name!r}")
