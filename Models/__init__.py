"""The model registry: one line per model, `name: "module:Class"`, imported on first use.

DiffMM's model is the authors' `Model.py`; every other model is one file in this folder. A class
implements the contract of `Models/base.py` (README, "Adding a model"; docs/models/adding-a-model.md).
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Type

REGISTRY: Dict[str, str] = {
    "diffmm": "Model:DiffMM",
    "mf": "Models.mf:MF",
    "lightgcn": "Models.lightgcn:LightGCN",
    "vbpr": "Models.vbpr:VBPR",
    "lattice": "Models.lattice:LATTICE",
    "freedom": "Models.freedom:FREEDOM",
    "bm3": "Models.bm3:BM3",
    "lgmrec": "Models.lgmrec:LGMRec",
    "diffrec": "Models.diffrec:DiffRec",
    "mmssl": "Models.mmssl:MMSSL",
    "mdmns": "Models.mdmns:MDMNS",
    "pop": "Models.pop:Popularity",
}


def model_names() -> List[str]:
    return list(REGISTRY)


def get_model(name: str) -> Type:
    """The class registered under `name` (a KeyError for an unknown name: Params checks names first)."""
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)
