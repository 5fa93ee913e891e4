"""The model registry: one line per model, `name: "module:Class"`, imported on first use.

DiffMM's model is the authors' `Model.py`; every other model is one file in this folder. A class
implements the contract of `Models/base.py` (README, "Adding a model"; docs/models/adding-a-model.md).
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Type

# The order is DiffMM's Table 2 column order (the models the paper lacks after its columns): the table and every
# listing of models follow it, so a new model is placed by where its line goes, nowhere else.
REGISTRY: Dict[str, str] = {
    "diffmm": "Model:DiffMM",
    "mf": "Models.mf:MF",
    "ngcf": "Models.ngcf:NGCF",
    "lightgcn": "Models.lightgcn:LightGCN",
    "diffrec": "Models.diffrec:DiffRec",
    "sgl": "Models.sgl:SGL",
    "ncl": "Models.ncl:NCL",
    "hccf": "Models.hccf:HCCF",
    "vbpr": "Models.vbpr:VBPR",
    "lattice": "Models.lattice:LATTICE",
    "bm3": "Models.bm3:BM3",
    "freedom": "Models.freedom:FREEDOM",
    "lgmrec": "Models.lgmrec:LGMRec",
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
