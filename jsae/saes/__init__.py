"""SAE families: the protocol, the registry, and the families themselves.

    params = jsae.saes.get("jumprelu").init(key, d_in=2304, d_sae=16384)
"""

from jsae.saes.base import Family, LossSettings, family_of, get, names, register
from jsae.saes import jumprelu as _jumprelu  # registers "jumprelu"
from jsae.saes.jumprelu import JumpReLUParams

__all__ = ["Family", "LossSettings", "JumpReLUParams", "family_of", "get", "names",
           "register"]
