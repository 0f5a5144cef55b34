"""SAE families: the contract, the registry, and the families themselves.

    params = jsae.saes.get("jumprelu").init(key, d_in=2304, d_sae=16384)
"""

from jsae.saes import jumprelu  # registers itself
from jsae.saes.base import (Family, FamilyConfigError, Field, NoState, Output,
                            family_of, field_defaults, get, names, register)
from jsae.saes.jumprelu import JumpReLUParams

__all__ = ["Family", "FamilyConfigError", "Field", "JumpReLUParams", "NoState", "Output",
           "family_of", "field_defaults", "get", "jumprelu", "names", "register"]
