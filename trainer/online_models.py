"""Imports every module that registers an online model for the prequential protocol.

The online trainer (issue 4) adds its modules here (e.g. `online-bpr`, `online-mf`); the harness
imports this module before looking a model up, so registration needs no other wiring.
"""

import importlib

ONLINE_MODEL_MODULES: tuple[str, ...] = ("trainer.evaluation.prequential", "trainer.online.harness")

for _name in ONLINE_MODEL_MODULES:
    importlib.import_module(_name)
