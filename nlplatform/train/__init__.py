"""Training: the LightningModule, its callbacks and the run entry point (``train``). Lightning lives here."""
