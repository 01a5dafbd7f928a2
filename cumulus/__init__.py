"""Compatibility names of the original Cumulus SDK (``from cumulus.sdk import CumulusClient``).

New code should import from :mod:`cumulus_jupyter`.
"""
