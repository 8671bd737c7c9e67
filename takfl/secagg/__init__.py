"""Secure aggregation within a prototype (SecAgg+, Bell et al. 2020, arXiv 2009.08452), pure.

The coordinator learns only the sum of a round's updates of a prototype. Each client
masks its fixed-point encoded update with pairwise masks (agreed by X25519 with its
neighbours, expanded by AES-CTR) and a self mask; the pairwise masks cancel in the sum,
and the shares of the mask seeds (Shamir, threshold t) let the server cancel the masks
of clients that drop out, as long as t of each one's neighbours stay. Broker-free: the
messages are dataclasses; ``coordinator`` and ``edge_agent`` carry them.
"""
