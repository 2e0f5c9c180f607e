"""saddlescape on PyTorch models (an optional extra: ``pip install "saddlescape[torch]"``).

:class:`RMSProp` and :class:`Adam` are ``torch.optim.Optimizer`` subclasses with diagonal,
block-diagonal full-matrix or full-matrix second moments (:mod:`saddlescape.torch.optim`);
:class:`SaddleEscape` is Algorithm 4 on top of one of them. :mod:`saddlescape.torch.distributed`
holds the data-parallel optimizer with block preconditioners sharded over the ranks of a
``torch.distributed`` process group.
"""

from saddlescape.torch.optim import Adam, RMSProp, SaddleEscape

__all__ = ["Adam", "RMSProp", "SaddleEscape"]
