"""The Jupyter server side: the extension, its REST handlers and the job lifecycle.

Runs in the Jupyter server's process and event loop. It never imports torch
and never unpickles what a client sent.
"""
