"""Model families, one module each, looked up by name in ``nlplatform.registry`` and imported only when used.

Each family module defines ``CONFIG`` (a ``ModelConfig`` subclass), ``MODEL`` (the ``nn.Module``) and ``PRESETS``.
"""
