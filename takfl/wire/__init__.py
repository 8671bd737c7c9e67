"""The wire format shared by the coordinator and the agents: topics, messages,
tensor codec, chunking, signing and update validation. Pure: no network.

Import what you use from its module (``takfl.wire.messages``, ``takfl.wire.codec``, ...):
the package itself imports nothing, so a process that only reads messages (an inference
service) never loads the tensor codec and torch.
"""
