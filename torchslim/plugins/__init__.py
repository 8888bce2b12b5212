"""Built-in stages: one module per stage family, registered in ``torchslim.engine.registry``."""
