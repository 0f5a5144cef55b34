"""Looking at latents: a streaming pass that keeps, for every latent, its top-activating
contexts, a seeded sample for quantile bands, an activation histogram and its density;
direct logit effects; a static browser site and a Neuronpedia-compatible export.

    result = jsae.browse.browse(config, sae, lm, contexts, "browser/")   # see run.browse
"""

from jsae.browse.run import BrowseError, BrowseResult, browse

__all__ = ["BrowseError", "BrowseResult", "browse"]
