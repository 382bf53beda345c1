"""The text side: vocabularies with synonyms, prompt templates and cached text embeddings."""

from .encoder import TextEncoder, default_cache_dir
from .templates import TEMPLATE_SETS, resolve_templates
from .vocabulary import BACKGROUND, VocabClass, Vocabulary

__all__ = [
    "BACKGROUND",
    "TEMPLATE_SETS",
    "TextEncoder",
    "VocabClass",
    "Vocabulary",
    "default_cache_dir",
    "resolve_templates",
]
