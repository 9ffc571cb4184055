"""Tools around the models: speed and memory measurements (``bench``, ``timing``), deployment (``deploy``:
fold, export, verify; ``onnx_checks``), MODEL_CARD.md generation (``card``) and conversion of original checkpoints
(``convert_weights``). Each command of :mod:`wszoo.cli` that uses one imports it there."""
