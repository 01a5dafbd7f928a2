"""The kernel side: the client SDK, the magics and the widgets.

Runs in a notebook kernel or any Python process that talks to a cumulus
server over HTTP (``client``), plus what only a notebook needs (``magics``,
``widgets``, ``display``). Nothing here imports the server side.
"""
