"""sglang-marconi: Marconi prefix caching for hybrid (attention + SSM) LLMs in SGLang.

``policy`` is the plain-Python policy core (cost model, admission, utility,
α tuning); ``sglang_backend`` binds it to SGLang 0.5.23's UnifiedRadixCache;
``plugin`` registers ``--radix-cache-backend marconi``.
"""

__version__ = "0.1.0"
