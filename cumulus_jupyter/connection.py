"""How a kernel finds its cumulus server: the environment the extension exports.

At start the server extension puts its URL and token into the server's own
environment, which every kernel it starts inherits, so ``CumulusClient()``
needs no arguments there. Jobs never get the token (see
:data:`cumulus_jupyter.jobdir.SECRET_ENV`).
"""

from __future__ import annotations

#: The server's URL, base_url included.
URL_ENV = "CUMULUS_SERVER_URL"
#: The server's token, when it has one.
TOKEN_ENV = "CUMULUS_TOKEN"
