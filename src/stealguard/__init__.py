"""stealguard: defenses against model stealing (EDM, MAD) and honest measurement of them."""

__version__ = "0.1.0"
