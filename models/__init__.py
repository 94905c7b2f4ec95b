"""Recipes that build the benchmark models from packages that ship real weights, and their task metrics."""

from edgeprune.models.recipes import RECIPES, ModelArtifact, Recipe, build, cache_dir, get_recipe
from edgeprune.models.tasks import (
    data_dir,
    image_logits,
    imagenet_pixels,
    imagenet_top1,
    load_imagenet,
    top1_agreement,
    load_stsb,
    load_wikitext,
    sentence_embeddings,
    stsb_spearman,
    token_nll,
    wikitext_perplexity,
)

__all__ = [
    "RECIPES",
    "ModelArtifact",
    "Recipe",
    "build",
    "cache_dir",
    "data_dir",
    "get_recipe",
    "image_logits",
    "imagenet_pixels",
    "imagenet_top1",
    "load_imagenet",
    "top1_agreement",
    "load_stsb",
    "load_wikitext",
    "sentence_embeddings",
    "stsb_spearman",
    "token_nll",
    "wikitext_perplexity",
]
