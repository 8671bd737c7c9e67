"""The state-dict type every module speaks: parameter and buffer name -> tensor.

``State`` is a model's weights as ``nn.Module.state_dict()`` gives them (and as a
checkpoint, an update or an aggregate holds them); ``StateView`` is the read-only
form for functions that only look.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

State = dict[str, torch.Tensor]
StateView = Mapping[str, torch.Tensor]
