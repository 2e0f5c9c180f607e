"""saddlescape on PyTorch models (an optional extra: ``pip install "saddlescape[torch]"``).

:mod:`saddlescape.torch.distributed` holds the data-parallel optimizer with block
preconditioners sharded over the ranks of a ``torch.distributed`` process group.
"""
