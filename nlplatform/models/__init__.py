"""Model families, one module each, looked up by name in ``nlplatform.registry`` and imported only when used.

``base.py`` holds what they share (size fields, the pre-norm block stack, accounting); each family module defines
its mixer, its levels, its presets and ``SPECS`` (the registry entries it provides).
"""
