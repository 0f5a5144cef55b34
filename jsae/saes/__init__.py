"""SAE families: the contract, the registry, and the families themselves.

    params = jsae.saes.get("jumprelu").init(key, d_in=2304, d_sae=16384)
    jsae.saes.names()   # ['batchtopk', 'gated', 'jumprelu', 'matryoshka', 'relu', 'topk']
"""

from jsae.saes import gated, jumprelu, matryoshka, relu, topk  # each registers itself
from jsae.saes.base import (Family, FamilyConfigError, Field, NoState, Output,
                            family_of, field_defaults, get, inference_names, names,
                            register)
from jsae.saes.gated import GatedParams
from jsae.saes.jumprelu import JumpReLUParams
from jsae.saes.matryoshka import MatryoshkaParams
from jsae.saes.relu import ReLUParams
from jsae.saes.topk import BatchTopKParams, ThresholdState, TopKParams

__all__ = ["BatchTopKParams", "Family", "FamilyConfigError", "Field", "GatedParams",
           "JumpReLUParams", "MatryoshkaParams", "NoState", "Output", "ReLUParams",
           "ThresholdState", "TopKParams", "family_of", "field_defaults", "get", "gated",
           "inference_names",
           "jumprelu", "matryoshka", "names", "register", "relu", "topk"]
