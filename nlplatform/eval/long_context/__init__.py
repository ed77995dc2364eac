"""The long-context suite (``nlplatform eval CHECKPOINT --suite long_context``): ``probes.py`` builds RULER-style
needle-in-a-haystack and passkey probes, ``scoring.py`` scores them and the loss by position, ``plots.py`` draws
them, ``suite.py`` runs the suite."""
