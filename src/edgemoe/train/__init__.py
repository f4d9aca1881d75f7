"""edgemoe.train: Stable-MoE training over edge servers (see docs/training.md).

- :mod:`edgemoe.train.data`: digits, Fashion-MNIST, CIFAR-10 (pickles or JPEG zip), CIFAR-100, SVHN;
- :mod:`edgemoe.train.model`: the router-side backbone, gate (any ``edgemoe.moe`` router) and head;
- :mod:`edgemoe.train.server`: one edge server's expert, optimizer and FIFO queue;
- :mod:`edgemoe.train.trainer`: the slot-driven trainer; :mod:`edgemoe.train.transport` /
  :mod:`edgemoe.train.dist`: the ``inproc`` and ``dist`` transports;
- :mod:`edgemoe.train.checkpoint`: atomic, verified checkpoints;

Submodules are imported on use so that, e.g., the data loaders do not pull in the controllers.
"""
