"""Item texts and images to `<modality>_feat.npy` files of a dataset folder (`prepare.py features`).

DiffMM (Jiang et al., ACM MM 2024) trains on per-item feature rows: on its Amazon data (Baby, Sports, the files
MMSSL and LATTICE released) the item's text through Sentence-BERT (Reimers & Gurevych, EMNLP 2019) and the
item's image through an ImageNet CNN. The released Baby/Sports text rows are
`SentenceTransformer('stsb-roberta-large').encode(texts)` of each item's categories, title and description
joined with spaces (LATTICE, github.com/CRIPAC-DIG/LATTICE `data/build_data.py` at 57b449e, "Text Features"),
and the image rows are the 4,096-d second fully connected layer (fc7) of the Caffe reference network (the
Amazon dump of McAuley et al., SIGIR 2015, used by VBPR, He & McAuley, AAAI 2016), read by the same script, which fills
items without an image with the mean of the others. The defaults here follow that recipe with what
requirements-encoders.txt installs (sentence-transformers, which brings transformers, and Pillow):
`sentence-transformers/stsb-roberta-large` (1,024-d) and an ImageNet CNN through transformers,
`hf:microsoft/resnet-50` (its pooled 2,048-d output). torchvision's AlexNet up to fc7 (4,096-d), the network the
Caffe reference model re-implements and so the nearest to the released rows, is `--image_model alexnet`; it needs
torchvision built for the installed torch, which no requirements file can pin (docs/features.md).

Rows follow the dataset's item order (`item_ids.txt`, written by `prepare.py raw`: line i is the raw id of item
i). Encoding runs in chunks that are each written to a work folder beside the output as soon as they are done,
so that a rerun after an interruption encodes only what is left; the feature file itself is written under a
temporary name and renamed into place once complete. The encoders (sentence-transformers; torchvision or
transformers; Pillow) are optional: they are imported here only, when asked for.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from DataHandler import feature_files, load_features
from Utils.files import atomic_write, atomic_write_text
from Utils.formats import (ITEM_IDS, USER_IDS, DataError, check_disjoint, detect_layout, read_id_lines, read_splits,
                           write_dataset, write_id_map)
from Utils.device import resolve_device, resolve_threads

log = logging.getLogger("diffmm")

DEFAULT_TEXT_MODEL = "sentence-transformers/stsb-roberta-large"
# a transformers model: it needs only what requirements-encoders.txt installs (torchvision models such as alexnet
# need a torchvision built for the installed torch)
DEFAULT_IMAGE_MODEL = "hf:microsoft/resnet-50"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MISSING_CHOICES = ("zero", "mean", "drop")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WORK_FORMAT = 1  # bump when what a chunk holds changes: older work folders are then started over
EXAMPLES = 3  # ids or files quoted in a report line
# in the dataset folder while the feature files of one run are renamed into place: the modalities being written,
# so that a rerun after a kill between two renames takes the first file as its own rather than refusing it
PENDING = ".features.pending.json"


@dataclass
class Inputs:
    """What one modality encodes: the dataset rows (item indices, ascending) that have an input, the input of
    each (a text, or an image file), a key per input that changes when the input does (for resuming), and the
    rows without an input with the reason, for the report."""

    modality: str
    rows: np.ndarray
    values: List[str]
    keys: List[str]
    missing: Dict[str, List[int]] = field(default_factory=dict)  # reason -> rows


# ---------------------------------------------------------------------------------------------
# Reading the inputs
# ---------------------------------------------------------------------------------------------

def read_item_ids(folder: Path) -> np.ndarray:
    """The raw item ids of a dataset folder in its item order (`item_ids.txt`, line i = raw id of item i)."""
    path = folder / "item_ids.txt"
    if not path.is_file():
        raise DataError(f"{folder} has no item_ids.txt, which maps the dataset's items to your raw item ids; make the "
                        f"folder with `python prepare.py raw` (it writes the file) or write it yourself (line i = the "
                        f"raw id of item i).")
    ids = np.array(read_id_lines(path), dtype=str)  # exactly as `prepare.py raw` wrote them
    if len(ids) == 0:
        raise DataError(f"{path} lists no item id; line i must be the raw id of item i.")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{path} lists the raw id {unique[counts > 1][0]!r} {counts[counts > 1][0]} times; each line "
                        f"must be a different item.")
    return ids


def _lookup(item_ids: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Dataset row of each raw id, -1 where the dataset has no such item (vectorised: a sorted search)."""
    if len(raw) == 0:
        return np.zeros(0, dtype=np.int64)
    sorter = np.argsort(item_ids)
    pos = np.clip(np.searchsorted(item_ids, raw, sorter=sorter), 0, len(item_ids) - 1)
    rows = sorter[pos]
    return np.where(item_ids[rows] == raw, rows, -1).astype(np.int64)


def _examples(values: Sequence[str]) -> str:
    shown = ", ".join(str(v) for v in list(values)[:EXAMPLES])
    return f"{shown}, ..." if len(values) > EXAMPLES else shown


def read_item_texts(path: Path, id_col: str, text_cols: Optional[Sequence[str]], item_ids: np.ndarray) -> Inputs:
    """The text of each item from a CSV/TSV table with a header: the `text_cols` cells (default: every column but
    `id_col`) joined with spaces, white space collapsed (LATTICE joins its fields the same way).

    Ids the dataset does not have are skipped and reported (an item table usually covers the whole catalogue,
    of which the k-core filter kept a part); an item given twice is an error; an empty text counts as missing.
    """
    if not path.is_file():
        raise DataError(f"missing item table {path}: pass a CSV/TSV with a header (an item id column and text "
                        f"columns) to --items.")
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))  # product descriptions can be longer than csv's 128 KB
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM must not become part of the first name
        sample = f.read(65536)
        f.seek(0)
        delimiter = "\t" if path.suffix in (".tsv", ".tab") or sample.count("\t") > sample.count(",") else ","
        reader = csv.reader(f, delimiter=delimiter)
        header = [h.strip() for h in next(reader, [])]
        if id_col not in header:
            raise DataError(f"{path} has no column {id_col!r} in its header ({', '.join(header) or 'empty'}); name the "
                            f"item id column with --id_col.")
        columns = list(text_cols) if text_cols else [c for c in header if c != id_col]
        unknown = [c for c in columns if c not in header]
        if unknown or not columns:
            which = ", ".join(map(repr, unknown)) if unknown else f"besides {id_col!r}"
            raise DataError(f"{path} has no text column {which} in its header ({', '.join(header)}); name the text "
                            f"columns with --text_cols.")
        id_at = header.index(id_col)
        text_at = [header.index(c) for c in columns]
        width = len(header)
        raw_ids: List[str] = []
        texts: List[str] = []
        lines: List[int] = []
        for row in reader:
            if not row:
                continue
            row = row + [""] * (width - len(row))  # a short row: the cells it lacks are empty
            raw_ids.append(row[id_at])
            texts.append(" ".join(" ".join(row[k] for k in text_at).split()))
            lines.append(reader.line_num)
    raw = np.array(raw_ids, dtype=str)
    rows = _lookup(item_ids, raw)
    # ids match exactly (a raw id may begin or end with spaces or separators); only an id matching no item is
    # tried again without surrounding white space, as a table written with ", " between its cells has it
    retry = np.flatnonzero(rows < 0)
    if len(retry):
        rows[retry] = _lookup(item_ids, np.array([raw_ids[k].strip() for k in retry], dtype=str))
    known = rows >= 0
    if (~known).any():
        unknown_rows = [f"{raw_ids[k]!r} (line {lines[k]})" for k in np.flatnonzero(~known)[:EXAMPLES + 1]]
        log.warning(f"warning: {path}: {int((~known).sum())} rows name items that are not in the dataset (no line of "
                    f"item_ids.txt), skipped: {_examples(unknown_rows)}")
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    again = np.flatnonzero((sorted_rows[1:] == sorted_rows[:-1]) & (sorted_rows[1:] >= 0))
    if len(again):
        first, second = order[again[0]], order[again[0] + 1]
        raise DataError(f"{path} line {lines[second]}: item {raw_ids[second]!r} has a row already (line "
                        f"{lines[first]}); keep one row per item.")
    has_text = np.array([bool(t) for t in texts], dtype=bool)
    empty_rows = rows[known & ~has_text]
    use = order[known[order] & has_text[order]]
    absent = np.setdiff1d(np.arange(len(item_ids)), rows[known])
    return Inputs("text", rows[use], [texts[k] for k in use], [texts[k] for k in use],
                  {f"no row in {path.name}": absent.tolist(), "an empty text": np.sort(empty_rows).tolist()})


def find_item_images(folder: Path, item_ids: np.ndarray) -> Inputs:
    """The image file of each item: `<raw id>.<jpg|png|...>` in `folder` (not its subfolders).

    Files whose name is no item id are skipped and reported; an item with several files (a.jpg, a.png) uses
    the first by name. The key of a file for resuming is its name, size and modification time.
    """
    if not folder.is_dir():
        raise DataError(f"there is no image folder {folder}; pass the folder of item images (<item id>.jpg, .png, ...) "
                        f"to --images.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    stems = np.array([p.stem for p in files], dtype=str)
    rows = _lookup(item_ids, stems)
    known = rows >= 0
    if (~known).any():
        log.warning(f"warning: {folder}: {int((~known).sum())} image files are named after no item of the dataset "
                    f"(no line of item_ids.txt), skipped: {_examples([files[k].name for k in np.flatnonzero(~known)])}")
    order = np.argsort(rows, kind="stable")  # stable: the first file by name comes first for each item
    sorted_rows = rows[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_rows[1:] != sorted_rows[:-1]
    extra = order[~first & (sorted_rows >= 0)]
    if len(extra):
        log.warning(f"warning: {folder}: {len(extra)} items have more than one image file; the first by name is used, "
                    f"these are not: {_examples([files[k].name for k in extra])}")
    use = order[first & (sorted_rows >= 0)]
    keys = []
    for k in use:
        stat = files[k].stat()
        keys.append(f"{files[k].name}\t{stat.st_size}\t{stat.st_mtime_ns}")
    absent = np.setdiff1d(np.arange(len(item_ids)), rows[use])
    return Inputs("image", rows[use], [str(files[k]) for k in use], keys, {"no image file": absent.tolist()})


# ---------------------------------------------------------------------------------------------
# Encoders: a batch of inputs -> (float32 rows, ok mask, messages of the inputs that failed)
# ---------------------------------------------------------------------------------------------

def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def _require(module: str, package: str, purpose: str):
    """Import an optional dependency, or say in one sentence which package to install."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{purpose} needs the {package} package, which is not installed: `pip install {package}` "
                        f"(docs/features.md, requirements-encoders.txt); nothing was written.") from None


def is_hf_image_model(name: str) -> bool:
    """A Hugging Face transformers image model: `hf:<hub id>` or a local folder holding a config.json."""
    return name.startswith("hf:") or (Path(name).is_dir() and (Path(name) / "config.json").is_file())


def check_dependencies(text: bool, image_model: Optional[str]) -> None:
    """Import what the asked-for encoders need before anything is read or written."""
    if text:
        _require("sentence_transformers", "sentence-transformers", "encoding item texts")
    if image_model is None:
        return
    _require("PIL", "pillow", "encoding item images")
    if is_hf_image_model(image_model):
        _require("transformers", "transformers", f"the image model {image_model}")
        return
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise DataError(f"the image model {image_model!r} is a torchvision architecture and torchvision is not "
                        f"installed: install the build made for torch {torch.__version__} (`pip install --no-deps "
                        f"torchvision==<its version>` from the index torch came from; docs/features.md), or use a "
                        f"Hugging Face image model (the default, {DEFAULT_IMAGE_MODEL}); nothing was written."
                        ) from None
    except Exception as e:  # a torchvision built for another torch fails inside its own import
        raise DataError(f"torchvision is installed but does not load with torch {torch.__version__} ({_short(e)}): "
                        f"install the torchvision build made for this torch (same version pairing and same index, "
                        f"e.g. the CPU one for a CPU torch; docs/features.md), or use a Hugging Face image model "
                        f"(the default, {DEFAULT_IMAGE_MODEL}); nothing was written.") from None


class TextEncoder:
    """Sentence-BERT rows: `SentenceTransformer(model).encode(texts)`, the model's own pooling (and normalisation
    if the model has it), as LATTICE's build_data.py computed the released text features."""

    def __init__(self, model: str, device: torch.device) -> None:
        st = _require("sentence_transformers", "sentence-transformers", "encoding item texts")
        try:
            self.model = st.SentenceTransformer(model, device=str(device))
        except Exception as e:  # no network, a typo, a folder that is not a saved model: all say the same to a user
            raise DataError(f"could not load or download the sentence-transformers model {model!r} ({_short(e)}); "
                            f"check the name, or without network access pass a local folder holding the model "
                            f"(saved with SentenceTransformer.save) to --text_model.") from None
        self.model.eval()

    def encode(self, texts: List[str]) -> Tuple[np.ndarray, np.ndarray, List[str]]:
        with torch.inference_mode():
            values = self.model.encode(texts, batch_size=max(1, len(texts)), convert_to_numpy=True,
                                       show_progress_bar=False)
        return np.asarray(values, dtype=np.float32).reshape(len(texts), -1), np.ones(len(texts), dtype=bool), []


def _load_image(path: str, transform: Callable) -> Tuple[Optional[object], str]:
    """(the transformed image or None, the reason it could not be read). Decoding is forced here (convert), so
    that a truncated file fails now, not inside the batch."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            return transform(image.convert("RGB")), ""
    except Exception as e:  # PIL raises many types for a broken file (UnidentifiedImageError, OSError, ValueError)
        return None, f"{path} ({_short(e)})"


class ImageEncoder:
    """Penultimate-layer rows of an image network: a torchvision architecture with its last Linear (the
    classifier) replaced by the identity (AlexNet/VGG: fc7 after its ReLU, 4,096-d; ResNet-50: the pooled
    2,048-d), or a Hugging Face transformers model's pooled output (`get_image_features` where it has one).

    `weights` (torchvision only): `default` (torchvision's DEFAULT weights, downloaded once to the torch hub
    cache), a weights name (`IMAGENET1K_V1`), a state_dict file, or `none` (random, seeded: the same network on
    every run, for tests). Preprocessing: the weights' own transforms, or when `image_size` is given (or there are
    no named weights) resize to 256/224 of it, centre crop, ImageNet mean/std.
    """

    def __init__(self, model: str, weights: str, image_size: Optional[int], device: torch.device,
                 workers: int) -> None:
        self.device = device
        self.workers = max(1, workers)
        if is_hf_image_model(model):
            self._init_hf(model[3:] if model.startswith("hf:") else model)
        else:
            self._init_torchvision(model, weights, image_size)
        self.network.eval().to(device)

    def _init_torchvision(self, name: str, weights: str, image_size: Optional[int]) -> None:
        from torchvision import models, transforms
        known = models.list_models(module=models)
        if name.lower() not in known:
            raise DataError(f"{name!r} is not a torchvision classification model; use one of alexnet, vgg16, "
                            f"resnet50, vit_b_16, ... (torchvision.models.list_models()), or hf:<id> / a local "
                            f"folder for a Hugging Face model.")
        name = name.lower()
        enum = models.get_model_weights(name)
        preset = None
        if weights.lower() == "none":
            torch.manual_seed(0)  # the same random network on every run, so that a resumed run matches
            network = models.get_model(name, weights=None)
        elif Path(weights).is_file():
            network = models.get_model(name, weights=None)
            try:
                network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            except Exception as e:
                raise DataError(f"{weights} is not a state_dict of torchvision's {name} ({_short(e)}); save one with "
                                f"torch.save(model.state_dict(), path).") from None
        else:
            try:
                chosen = enum.DEFAULT if weights.lower() == "default" else enum[weights]
            except KeyError:
                raise DataError(f"--image_weights {weights!r} is none of default, none, a state_dict file, or "
                                f"{name}'s weights ({', '.join(w.name for w in enum)}).") from None
            try:
                network = models.get_model(name, weights=chosen)
            except Exception as e:
                raise DataError(f"could not load or download torchvision's {name} weights {chosen.name} "
                                f"({_short(e)}); without network access pass the weights as a state_dict file to "
                                f"--image_weights.") from None
            preset = chosen.transforms()
        last = [n for n, m in network.named_modules() if isinstance(m, torch.nn.Linear)][-1]
        parent, _, child = last.rpartition(".")
        setattr(network.get_submodule(parent) if parent else network, child, torch.nn.Identity())
        self.network = network
        if preset is not None and image_size is None:
            self.transform = preset
        else:
            size = image_size or 224
            self.transform = transforms.Compose([
                transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size), transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.forward = lambda x: self.network(x)

    def _init_hf(self, source: str) -> None:
        transformers = _require("transformers", "transformers", f"the image model {source}")
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(source)
            self.network = transformers.AutoModel.from_pretrained(source)
        except Exception as e:
            raise DataError(f"could not load or download the Hugging Face image model {source!r} ({_short(e)}); check "
                            f"the name, or without network access pass a local folder holding the model and its "
                            f"image processor (save_pretrained) to --image_model.") from None
        self.transform = lambda image: processor(images=image, return_tensors="pt")["pixel_values"][0]

        def forward(x: torch.Tensor) -> torch.Tensor:
            if hasattr(self.network, "get_image_features"):  # CLIP-like: the projected image embedding
                out = self.network.get_image_features(pixel_values=x)
            else:
                out = self.network(pixel_values=x)
            if isinstance(out, torch.Tensor):
                return out
            pooled = getattr(out, "pooler_output", None)
            return pooled if pooled is not None else out.last_hidden_state.mean(dim=1)
        self.forward = forward

    def encode(self, paths: List[str]) -> Tuple[np.ndarray, np.ndarray, List[str]]:
        with ThreadPoolExecutor(self.workers) as pool:  # decoding and resizing release the GIL
            loaded = list(pool.map(lambda p: _load_image(p, self.transform), paths))
        ok = np.array([image is not None for image, _ in loaded], dtype=bool)
        errors = [reason for image, reason in loaded if image is None]
        if not ok.any():
            return np.zeros((len(paths), 0), dtype=np.float32), ok, errors
        batch = torch.stack([image for image, _ in loaded if image is not None]).to(self.device)
        with torch.inference_mode():
            out = self.forward(batch).flatten(1).float().cpu().numpy()
        values = np.zeros((len(paths), out.shape[1]), dtype=np.float32)
        values[ok] = out
        return values, ok, errors


# ---------------------------------------------------------------------------------------------
# Chunked, resumable encoding
# ---------------------------------------------------------------------------------------------

def _fingerprint(inputs: Inputs, model: Dict[str, object], chunk_size: int, n_items: int) -> Dict[str, object]:
    digest = hashlib.sha256()
    for row, key in zip(inputs.rows.tolist(), inputs.keys):
        digest.update(f"{row}\t{key}\0".encode("utf-8"))
    return {"format": WORK_FORMAT, "modality": inputs.modality, "model": model, "chunk_size": chunk_size,
            "items": n_items, "inputs": len(inputs.rows), "sha256": digest.hexdigest()}


def _write_atomic(path: Path, write: Callable) -> None:
    """`write(binary file)` into `path` by the package's atomic writer: a kill leaves no half-written `path`."""
    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_write(path, to_file, then="run the same command again (finished chunks are kept)")


def _read_chunk(path: Path, size: int) -> Optional[Dict[str, np.ndarray]]:
    """A finished chunk, or None when the file is not one of `size` inputs (then it is encoded again)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            chunk = {k: z[k] for k in ("values", "ok", "errors")}
    except Exception:
        return None
    if len(chunk["ok"]) != size or len(chunk["values"]) != size:
        return None
    return chunk


def _encode_chunk(encoder, inputs: Inputs, start: int, stop: int, batch_size: int, bar: tqdm
                  ) -> Dict[str, np.ndarray]:
    """Inputs start..stop in batches: {values (rows x d, zero where failed), ok, errors}."""
    parts, oks, errors = [], [], []
    for b in range(start, stop, batch_size):
        values, ok, failed = encoder.encode(inputs.values[b:min(b + batch_size, stop)])
        parts.append(values)
        oks.append(ok)
        errors.extend(failed)
        bar.update(len(ok))
    dims = {p.shape[1] for p, o in zip(parts, oks) if o.any()}
    if len(dims) > 1:
        raise DataError(f"the {inputs.modality} encoder returned rows of different widths {sorted(dims)}.")
    dim = dims.pop() if dims else 0
    values = np.concatenate([p if p.shape[1] == dim else np.zeros((len(o), dim), np.float32)
                             for p, o in zip(parts, oks)])
    return {"values": values, "ok": np.concatenate(oks), "errors": np.array(errors, dtype=str)}


def encode_resumable(inputs: Inputs, make_encoder: Callable[[], object], model: Dict[str, object], work: Path,
                     n_items: int, chunk_size: int, batch_size: int, progress: bool
                     ) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Encode `inputs` in chunks of `chunk_size`, each saved to `work/chunk_NNNNNN.npz` when done; chunks already
    there from an earlier run of the same inputs and model are read, not encoded again (the encoder is built
    only if a chunk is left). Returns (float32 rows of the inputs, ok mask, messages of the inputs that failed).
    """
    manifest_path = work / "manifest.json"
    manifest = json.loads(json.dumps(_fingerprint(inputs, model, chunk_size, n_items)))  # as it reads back
    if work.is_dir():
        try:
            same = json.loads(manifest_path.read_text()) == manifest
        except (OSError, ValueError):
            same = False
        if not same:
            if any(work.glob("chunk_*.npz")):
                log.info(f"{work} holds chunks of other inputs or another model; encoding {inputs.modality} from "
                         f"the start")
            _clean_work(work)
    n = len(inputs.rows)
    starts = list(range(0, n, chunk_size))
    chunks: List[Optional[Dict[str, np.ndarray]]] = [
        _read_chunk(work / f"chunk_{k:06d}.npz", min(chunk_size, n - start)) for k, start in enumerate(starts)]
    done = sum(len(c["ok"]) for c in chunks if c is not None)
    if done:
        log.info(f"{inputs.modality}: {done} of {n} inputs were encoded by an earlier run ({work}); encoding the rest")
    encoder = None
    try:
        with tqdm(total=n, initial=done, desc=f"{inputs.modality}", unit="item", disable=not progress,
                  dynamic_ncols=True) as bar:
            for k, start in enumerate(starts):
                if chunks[k] is not None:
                    continue
                encoder = encoder or make_encoder()
                chunks[k] = _encode_chunk(encoder, inputs, start, min(start + chunk_size, n), batch_size, bar)
                if not manifest_path.is_file():  # the work folder appears with its first chunk
                    work.mkdir(parents=True, exist_ok=True)
                    _write_atomic(manifest_path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
                _write_atomic(work / f"chunk_{k:06d}.npz", lambda f, c=chunks[k]: np.savez(f, **c))
    except BaseException:
        if work.is_dir() and not any(work.glob("chunk_*.npz")):
            _clean_work(work)  # nothing to resume from: leave no folder behind
        raise
    dims = {c["values"].shape[1] for c in chunks if c["ok"].any()}
    if len(dims) > 1:
        raise DataError(f"the chunks in {work} hold rows of different widths {sorted(dims)}; delete the folder and run "
                        f"again.")
    dim = dims.pop() if dims else 0
    values = (np.concatenate([c["values"] if c["values"].shape[1] == dim else np.zeros((len(c["ok"]), dim), np.float32)
                              for c in chunks]) if chunks else np.zeros((0, 0), np.float32))
    ok = np.concatenate([c["ok"] for c in chunks]) if chunks else np.zeros(0, dtype=bool)
    errors = [str(e) for c in chunks for e in c["errors"].tolist()]
    return values, ok, errors


def _clean_work(work: Path) -> None:
    """Remove what encode_resumable wrote; the folder itself only if nothing else is in it."""
    for path in [*work.glob("chunk_*.npz"), *work.glob(".*.tmp"), work / "manifest.json"]:
        path.unlink(missing_ok=True)
    try:
        work.rmdir()
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

@dataclass
class FeatureRequest:
    """What `prepare.py features` was asked for (the flags of the same names)."""

    folder: Path
    items: Optional[Path] = None
    id_col: str = "item"
    text_cols: Optional[List[str]] = None
    images: Optional[Path] = None
    text_model: str = DEFAULT_TEXT_MODEL
    image_model: str = DEFAULT_IMAGE_MODEL
    image_weights: str = "default"
    image_size: Optional[int] = None
    device: str = "auto"
    batch_size: int = 64
    chunk_size: int = 2048
    threads: str = "auto"
    workers: int = 4
    dtype: str = "float32"
    missing_features: str = "zero"
    out: Optional[Path] = None
    overwrite: bool = False
    progress: bool = True


def _model_identity(request: FeatureRequest, modality: str) -> Dict[str, object]:
    """What fixes the numbers a chunk holds, for the work folder's manifest (a local path by its full path)."""
    def where(name: str) -> str:
        return str(Path(name).resolve()) if Path(name).exists() else name
    if modality == "text":
        return {"text_model": where(request.text_model)}
    weights = request.image_weights
    if Path(weights).is_file():
        stat = Path(weights).stat()
        weights = f"{Path(weights).resolve()}\t{stat.st_size}\t{stat.st_mtime_ns}"
    return {"image_model": where(request.image_model), "weights": weights, "image_size": request.image_size}


def _missing_report(inputs: Inputs, failed_rows: np.ndarray, errors: List[str], item_ids: np.ndarray,
                    n_items: int) -> Tuple[np.ndarray, str]:
    """(mask of the items without this modality, one report line)."""
    reasons = dict(inputs.missing)
    if len(failed_rows):
        reasons["an image that cannot be decoded"] = failed_rows.tolist()
    missing = np.zeros(n_items, dtype=bool)
    parts = []
    for reason, rows in reasons.items():
        if rows:
            missing[rows] = True
            parts.append(f"{len(rows)} with {reason} (e.g. {_examples(item_ids[rows].tolist())})")
    if errors:
        log.warning(f"warning: {len(errors)} image files cannot be decoded; their items are treated as missing: "
                    f"{_examples(errors)}")
    line = f"{int(missing.sum())} of {n_items}" + (f": {'; '.join(parts)}" if parts else "")
    return missing, line


def build_features(request: FeatureRequest) -> Dict[str, object]:
    """`prepare.py features`: encode the asked-for modalities and write `<modality>_feat.npy` into the dataset
    folder (`--missing_features zero|mean`), or a new dataset folder without the items that lack one
    (`drop`, `request.out`). Returns the report lines."""
    folder = request.folder
    if request.items is None and request.images is None:
        raise DataError("nothing to encode: pass an item table (--items) and/or a folder of item images (--images).")
    if not folder.is_dir():
        raise DataError(f"there is no dataset folder {folder}; pass --data and --data_dir (a folder written by "
                        f"`python prepare.py raw`).")
    if request.dtype not in ("float32", "float16"):
        raise DataError(f"--dtype {request.dtype!r} is not float32 or float16.")
    if request.missing_features not in MISSING_CHOICES:
        raise DataError(f"--missing_features {request.missing_features!r} is not one of {', '.join(MISSING_CHOICES)}.")
    if request.batch_size < 1 or request.chunk_size < 1:
        raise DataError("--batch_size and --chunk_size must be at least 1.")
    modalities = (["text"] if request.items is not None else []) + (["image"] if request.images is not None else [])
    drop = request.missing_features == "drop"
    if drop:
        if request.out is None:
            raise DataError(f"--missing_features drop writes a new dataset folder without the items that lack "
                            f"features: name it with --out (the dataset folder {folder} is never changed).")
        if request.out.exists() and any(request.out.iterdir()):
            raise DataError(f"{request.out} already exists and is not empty; choose a new folder for --out "
                            f"(nothing is overwritten).")
    elif request.out is not None:
        raise DataError("--out is for --missing_features drop (a new dataset folder); with zero or mean the feature "
                        "files are written into the dataset folder.")
    if not drop:
        pending = _pending(folder)
        for modality in modalities:
            existing = [p for p in (folder / f"{modality}_feat.npy", folder / f"{modality}_feat.npy.zip") if p.exists()]
            ours = [p for p in existing if p.name == f"{modality}_feat.npy" and modality in pending]
            if existing != ours and not request.overwrite:
                raise DataError(f"{existing[0]} exists already; pass --overwrite to replace it (nothing was written).")
    check_dependencies("text" in modalities, request.image_model if "image" in modalities else None)

    item_ids = read_item_ids(folder)
    n_items = len(item_ids)
    layout = detect_layout(folder)
    splits = read_splits(folder, layout, n_items)
    if splits[0].shape[1] != n_items:
        raise DataError(f"{folder / 'item_ids.txt'} lists {n_items} items but the dataset's matrices have "
                        f"{splits[0].shape[1]}; line i of item_ids.txt must be the raw id of item i.")
    inputs = []
    if request.items is not None:
        inputs.append(read_item_texts(request.items, request.id_col, request.text_cols, item_ids))
    if request.images is not None:
        inputs.append(find_item_images(request.images, item_ids))
    for one in inputs:
        if len(one.rows) == 0:
            source = request.items if one.modality == "text" else request.images
            what = "a text" if one.modality == "text" else "an image"
            raise DataError(f"no item of {folder} has {what} in {source}; check that its ids are the raw ids of "
                            f"item_ids.txt (--id_col for the table).")

    device = resolve_device(request.device)
    threads_before = torch.get_num_threads()
    resolve_threads(request.threads, device)
    report: Dict[str, object] = {}
    matrices: Dict[str, np.ndarray] = {}
    missing_any = np.zeros(n_items, dtype=bool)
    works: Dict[str, Path] = {}
    try:
        for one in inputs:
            work = (folder / f"{one.modality}_feat.work" if not drop
                    else request.out.parent / f"{request.out.name}.{one.modality}_feat.work")
            works[one.modality] = work
            if one.modality == "text":
                def make() -> TextEncoder:
                    return TextEncoder(request.text_model, device)
                name = request.text_model
            else:
                def make() -> ImageEncoder:
                    return ImageEncoder(request.image_model, request.image_weights, request.image_size, device,
                                        request.workers)
                name = request.image_model
            log.info(f"{one.modality}: {len(one.rows)} items to encode with {name} on {device}")
            values, ok, errors = encode_resumable(one, make, _model_identity(request, one.modality), work, n_items,
                                                  request.chunk_size, request.batch_size, request.progress)
            if not ok.any():
                raise DataError(f"no {one.modality} input of {folder} could be encoded (e.g. {_examples(errors)}); "
                                f"check the files.")
            missing, line = _missing_report(one, one.rows[~ok], errors, item_ids, n_items)
            matrix = np.zeros((n_items, values.shape[1]), dtype=np.float32)
            matrix[one.rows[ok]] = values[ok]
            if request.missing_features == "mean" and missing.any():
                matrix[missing] = matrix[~missing].mean(axis=0)  # LATTICE's build_data.py fills missing images so
            handling = {"zero": "zero rows", "mean": "the mean row", "drop": "dropped"}[request.missing_features]
            report[f"items without {one.modality} ({handling})"] = line
            missing_any |= missing
            matrices[one.modality] = _cast(matrix, request.dtype, one.modality)
        if not drop:
            # every modality is encoded (its chunks kept): now the files, each renamed into place, with the list
            # of them beside while that happens, and the chunks only once every file is there
            atomic_write_text(folder / PENDING, json.dumps({"modalities": list(matrices)}),
                              then="run the same command again (finished chunks are kept)")
            for modality, values in matrices.items():
                path = folder / f"{modality}_feat.npy"
                _write_into(works[modality], path, values)
                report[f"{modality} features"] = f"{path} ({n_items} x {values.shape[1]}, {request.dtype})"
            (folder / PENDING).unlink(missing_ok=True)
            for work in works.values():
                _clean_work(work)
        else:
            report.update(_write_dropped(folder, request.out, layout, splits, item_ids, ~missing_any, matrices,
                                         request.dtype))
            for work in works.values():
                _clean_work(work)
    finally:
        torch.set_num_threads(threads_before)
    return report


def _pending(folder: Path) -> List[str]:
    """The modalities whose feature files an interrupted run of `features` was renaming into `folder`."""
    try:
        return [str(m) for m in json.loads((folder / PENDING).read_text(encoding="utf-8"))["modalities"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _cast(matrix: np.ndarray, dtype: str, modality: str) -> np.ndarray:
    out = matrix.astype(dtype)
    if not np.isfinite(out).all():
        raise DataError(f"the {modality} features do not fit in {dtype} (values up to {np.abs(matrix).max():.3g}); "
                        f"use --dtype float32.")
    return out


def _write_into(work: Path, path: Path, matrix: np.ndarray) -> None:
    """Save in the work folder, then rename into place: the feature file appears only when complete."""
    staged = work / f"{path.stem}.partial.npy"
    _write_atomic(staged, lambda f: np.save(f, matrix, allow_pickle=False))
    try:
        os.replace(staged, path)
    except OSError as e:
        raise DataError(f"cannot write {path} ({e.strerror or e}); make the folder writable, then run the same "
                        f"command again.") from None


def _write_dropped(folder: Path, out: Path, layout: str, splits, item_ids: np.ndarray, keep: np.ndarray,
                   new: Dict[str, np.ndarray], dtype: str) -> Dict[str, object]:
    """A new dataset folder in the same layout holding only the items in `keep` (renumbered in order), their
    interactions, every feature file of `folder` cut to them and the new ones; user ids are unchanged."""
    if not keep.any():
        raise DataError(f"every item of {folder} lacks a feature, so --missing_features drop would leave nothing; use "
                        f"zero or mean.")
    kept = tuple(s.tocsc()[:, np.flatnonzero(keep)].tocsr() for s in splits)
    check_disjoint(kept, [f"{out} (train)", f"{out} (validation)", f"{out} (test)"])
    others = {m: load_features(p, len(item_ids))[keep] for m, p in feature_files(folder).items() if m not in new}
    user_ids = (folder / USER_IDS).read_bytes() if (folder / USER_IDS).is_file() else None

    def the_rest(staging: Path) -> None:  # into the staged folder, so that `out` appears with every file at once
        for modality, matrix in new.items():
            np.save(staging / f"{modality}_feat.npy", matrix[keep], allow_pickle=False)  # in --dtype
        if user_ids is not None:
            (staging / USER_IDS).write_bytes(user_ids)
        write_id_map(staging / ITEM_IDS, item_ids[keep].tolist())

    write_dataset(out, kept, others, layout, extra=the_rest,
                  then="run the same command again (finished chunks are kept)")
    return {"items dropped": int((~keep).sum()), "items": int(keep.sum()),
            "interactions dropped": int(sum(s.nnz for s in splits) - sum(s.nnz for s in kept)),
            "folder": f"{out} ({layout}; {', '.join(f'{m}_feat.npy' for m in new)} in {dtype})"}
