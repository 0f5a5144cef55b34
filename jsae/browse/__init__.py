"""Looking at latents: a streaming pass that keeps, for every latent, its top-activating
contexts, a seeded sample for quantile bands, an activation histogram and its density;
direct logit effects; a static browser site and a Neuronpedia-compatible export."""
