"""The device's local inference service: the active release's model behind a loopback
HTTP endpoint or a UNIX socket.

``model``: :class:`ModelHolder` (the served model, swapped atomically when a release
installs); ``stats``: :class:`InferenceStats` (requests, errors, latency); ``app``: the
endpoints as a pure request -> response unit; ``server``: the HTTP servers around it.
NumPy and the model's runtime only: serving never imports torch.
"""
