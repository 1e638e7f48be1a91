"""The sentence-transformers files of the library layout: every folder `save_native` writes (save_pretrained,
`virtue convert`, `virtue export`) also loads with `SentenceTransformer(path, trust_remote_code=True)`.

They describe a pipeline of `virtue.integrations.sentence_transformers.VirtueModule` (named here as a string, so
that writing the files needs neither sentence-transformers nor the integration module) and ST's own `Normalize`,
VIRTUE's instructions as `prompts`, and `requirements` naming the `virtue` package the module class comes from.
`SentenceTransformer.save` writes its own modules.json and config_sentence_transformers.json, so the integration
saves the weights without these files (`save_native(..., sentence_transformers=False)`).
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from virtue.processing.text import DATASET_IMAGE_TOKEN, SCAR_INSTRUCTION

MODULES_FILE = "modules.json"
ST_CONFIG_FILE = "config_sentence_transformers.json"
MODULE_CONFIG_FILE = "sentence_bert_config.json"  # the input module's config, at the root (ST's Transformer's name)
NORMALIZE_DIR = "1_Normalize"
NORMALIZE_TYPE = "sentence_transformers.base.modules.normalize.Normalize"
MODULE_TYPE = "virtue.integrations.sentence_transformers.VirtueModule"  # tested to name the class

# The instructions of the official evaluations, as prompts. "query" is what `encode_query` applies by default (a
# SCaR region query); "document" is empty because official candidates carry no instruction of their own: a text as
# given, an image alone as "<|image_pad|>\nRepresent the given image.\n", which is what embedding without a prompt
# gives. The MMEB ones are written as the MMEB-eval rows store them (`qry_inst` / `tgt_inst`, with `<|image_1|>\n`),
# which is what selects the official line layout; any other row's instruction can be passed as `prompt=`.
PROMPTS: dict[str, str] = {
    "query": SCAR_INSTRUCTION,
    "document": "",
    "mmeb_cls": f"{DATASET_IMAGE_TOKEN}\nRepresent the given image for classification",
    "mmeb_vqa": f"{DATASET_IMAGE_TOKEN}\nRepresent the given image with the following question:",
    "mmeb_t2i": "Find me an everyday image that matches the given caption:",
    "mmeb_image": f"{DATASET_IMAGE_TOKEN}\nRepresent the given image.",
}

# ST's `modality_config` (as its Transformer module writes it): which modalities ST may route to this module, and
# how each is read. All go through `VirtueModel.encode`; "message" is what lets ST pass mixed batches (texts next to
# images in one list) and chat messages. VIRTUE's visual prompts ride along in image dicts.
MODALITY_CONFIG: dict[Any, dict[str, Any]] = {
    "text": {"method": "encode", "method_output_name": None},
    "image": {"method": "encode", "method_output_name": None},
    ("image", "text"): {"method": "encode", "method_output_name": None},
    "message": {"method": "encode", "method_output_name": None, "format": "structured"},
}
OUTPUT_NAME = "sentence_embedding"


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def json_modality_config(config: dict[Any, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Tuple keys joined with "+", as ST's Transformer serialises them ("image+text")."""
    return {"+".join(k) if isinstance(k, tuple) else k: v for k, v in config.items()}


def module_config(image_resize: Sequence[int] | None = None) -> dict[str, Any]:
    return {
        "modality_config": json_modality_config(MODALITY_CONFIG),
        "module_output_name": OUTPUT_NAME,
        "image_resize": list(image_resize) if image_resize is not None else None,
    }


def write_module_config(path: str | Path, config: dict[str, Any] | None = None) -> None:
    """`sentence_bert_config.json`: the module's own settings (ST writes it through `VirtueModule.save` too)."""
    Path(path, MODULE_CONFIG_FILE).write_text(json.dumps(config or module_config(), indent=2) + "\n")


def write_sentence_transformers_files(path: str | Path) -> list[str]:
    """Make a library-layout folder loadable with `SentenceTransformer(path, trust_remote_code=True)`.

    Writes `modules.json` (`VirtueModule` at the root, ST's `Normalize` in `1_Normalize/`), `1_Normalize/config.json`,
    `config_sentence_transformers.json` (prompts, cosine similarity, version requirements) and
    `sentence_bert_config.json`. Needs no sentence-transformers: a folder saved where it is not installed works
    where it is. Called by the library save (`save_native`). Returns the names written, relative to `path`.
    """
    path = Path(path)
    (path / NORMALIZE_DIR).mkdir(parents=True, exist_ok=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": MODULE_TYPE},
        {"idx": 1, "name": "1", "path": NORMALIZE_DIR, "type": NORMALIZE_TYPE},
    ]
    (path / MODULES_FILE).write_text(json.dumps(modules, indent=2) + "\n")
    normalize = {"module_input_name": OUTPUT_NAME, "module_output_name": OUTPUT_NAME}
    (path / NORMALIZE_DIR / "config.json").write_text(json.dumps(normalize, indent=2) + "\n")
    versions = {name: installed_version(dist) for name, dist in (
        ("sentence_transformers", "sentence-transformers"), ("transformers", "transformers"), ("pytorch", "torch"))}
    st_config = {
        "model_type": "SentenceTransformer",
        "__version__": {k: v for k, v in versions.items() if v is not None},
        "prompts": dict(PROMPTS),
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
        "requirements": requirements(),
    }
    (path / ST_CONFIG_FILE).write_text(json.dumps(st_config, indent=2, sort_keys=True) + "\n")
    write_module_config(path)
    return [MODULES_FILE, f"{NORMALIZE_DIR}/config.json", ST_CONFIG_FILE, MODULE_CONFIG_FILE]


def requirements() -> dict[str, dict[str, str]]:
    """The `requirements` of config_sentence_transformers.json. ST checks them before it loads any module, so a
    missing or too old `virtue` is reported as such (with the pip command), not as a failed import."""
    version = installed_version("virtue") or "0.1.0"
    return {
        "virtue": {"specifier": f">={version}",
                   "reason": f"The input module ({MODULE_TYPE}) is imported from the installed virtue package."},
        "sentence_transformers": {"specifier": ">=6,<7",
                                  "reason": "VirtueModule is written against the sentence-transformers 6 API."},
    }
