"""The mteb (2.x) wrapper: mteb's own entry point on mini-SCaR gives `virtue eval`'s hit@1 (no_box variant) on the
rows without tied scores, the texts equal the official builders' for each MMEB family, and mteb breaks ties by
document id. Nothing is downloaded: tasks are defined here from local files, mteb's cache lives in tmp_path."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import require

mteb = require("mteb", "the mteb integration: pip install -e '.[mteb]'")
datasets = require("datasets", "mteb's datasets: pip install datasets")

from mteb._create_dataloaders import create_dataloader  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.types import PromptType  # noqa: E402

from tests.conftest import MINI_SCAR  # noqa: E402
from virtue.eval.datasets import load_mmeb_eval, load_scar_eval  # noqa: E402
from virtue.eval.metrics import rank_of_positive  # noqa: E402
from virtue.eval.runner import EvalConfig, run_eval  # noqa: E402
from virtue.images import load_image  # noqa: E402
from virtue.integrations.mteb import VirtueMtebModel, task_family  # noqa: E402

TIE_EPS = 1e-4  # a positive within this of another candidate's score is a tie (the paths agree to ~1e-6)
# Both harnesses squash the photos first (the official evaluation's 1344x1344 pre-resize, smaller: a fast test).
RESIZE = (224, 224)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("MTEB_CACHE", str(tmp_path / "mteb-default-cache"))


def metadata(name: str, category: str, prompt=None, task_type: str = "Any2AnyRetrieval") -> TaskMetadata:
    return TaskMetadata(
        name=name, description="A task defined in a test from local files.", reference=None,
        dataset={"path": "local", "revision": "local"}, type=task_type, category=category, eval_splits=["test"],
        eval_langs=["eng-Latn"], main_score="hit_rate_at_1", date=None, domains=None, task_subtypes=None,
        license=None, annotations_creators=None, dialect=None, modalities=["image", "text"], sample_creation=None,
        bibtex_citation=None, prompt=prompt,
    )  # fmt: skip


def per_query_task(meta: TaskMetadata, queries, captions: list[list[str]], doc_ids=None) -> AbsTaskRetrieval:
    """A retrieval task whose query i ranks only its own candidates `captions[i]` (positive first), through mteb's
    `top_ranked` (each query's candidate list; mteb then scores a query against those documents only). The corpus
    holds each distinct caption once, so a caption shared by two queries is one document, as in `virtue eval`.

    doc_ids: caption -> document id (default: d0000, d0001, ... in order of first appearance)."""
    doc_ids = dict(doc_ids or {})
    for row in captions:
        for text in row:
            doc_ids.setdefault(text, f"d{len(doc_ids):04d}")
    qids = list(queries["id"])
    split = RetrievalSplitData(
        queries=queries,
        corpus=datasets.Dataset.from_dict({"id": list(doc_ids.values()), "text": list(doc_ids)}),
        relevant_docs={q: {doc_ids[row[0]]: 1} for q, row in zip(qids, captions, strict=True)},
        top_ranked={q: [doc_ids[t] for t in row] for q, row in zip(qids, captions, strict=True)},
    )

    class LocalTask(AbsTaskRetrieval):
        def load_data(self, num_proc=None, **kwargs):
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    LocalTask.metadata = meta
    task = LocalTask()
    task.doc_text = {d: t for t, d in doc_ids.items()}
    return task


def run_mteb(wrapper, task, tmp_path):
    result = mteb.evaluate(wrapper, task, cache=mteb.ResultCache(tmp_path / "mteb-cache"), co2_tracker=False,
                           prediction_folder=tmp_path / "predictions", encode_kwargs={"batch_size": 16},
                           show_progress_bar=False, overwrite_strategy="always")  # fmt: skip
    [task_result] = result.task_results
    [scores] = task_result.scores["test"]
    predictions = json.loads((tmp_path / "predictions" / task.prediction_file_name).read_text())
    return scores, predictions["default"]["test"]


def test_mteb_hit1_equals_virtue_eval_no_box(tiny_model, tmp_path):
    source = pq.read_table(MINI_SCAR / "mini_scar.parquet")
    rows = source.to_pylist()
    instructions = {r["qry_text"].replace("<|image_1|>\n", "", 1) for r in rows}
    assert len(instructions) == 1  # one instruction for the task: mteb's TaskMetadata.prompt
    [instruction] = instructions

    # The no_box inputs exactly as `virtue eval` builds them, and their scores, to relabel and to find ties.
    full = load_scar_eval(MINI_SCAR / "mini_scar.parquet", MINI_SCAR, task="RefCOCOg", variant="no_box")
    vectors = tiny_model.encode(full.table.inputs, batch_size=16, show_progress_bar=False, image_resize=RESIZE)
    kept, kept_scores = [], []
    for i, (row, query) in enumerate(zip(rows, full, strict=True)):
        scores = vectors[query.candidate_ids] @ vectors[query.query_id]
        order = list(range(len(scores)))
        if i % 2 == 0:  # every other row: the model's favourite caption becomes the positive, so hit@1 is not ~0
            top = int(np.argmax(scores))
            order = [top] + [j for j in order if j != top]
        scores = scores[order]
        if np.abs(scores[1:] - scores[0]).min() <= TIE_EPS:
            continue  # the positive ties with another candidate: mteb and virtue eval score ties differently
        kept.append(dict(row, tgt_text=[row["tgt_text"][j] for j in order],
                         neg_types=[row["neg_types"][j] for j in order]))  # fmt: skip
        kept_scores.append(scores)
    assert len(kept) >= 60, f"only {len(kept)} of {len(rows)} rows without ties"

    scar_root = tmp_path / "scar"
    scar_root.mkdir()
    pq.write_table(pa.Table.from_pylist(kept, schema=source.schema), scar_root / "SCaR_eval_RefCOCOg.parquet")

    # `virtue eval` on those rows: the no_box baseline (whole image, no visual prompt, no bbox in the text).
    cfg = EvalConfig(benchmark="scar", data_root=str(scar_root), image_root=str(MINI_SCAR), tasks=("RefCOCOg",),
                     baselines=("no_box",), batch_size=16, image_resize=RESIZE, cache_dir=str(tmp_path / "cache"),
                     out_dir=str(tmp_path / "out"), show_progress_bar=False)  # fmt: skip
    ours = run_eval(tiny_model, cfg, model_name="tiny").baselines["no_box"]["RefCOCOg"]
    assert ours["n"] == len(kept)
    assert 0.3 < ours["hit@1"] < 0.9  # neither trivial

    # mteb: queries = the photos (mteb has no box), the instruction from the task; documents = the captions.
    queries = datasets.Dataset.from_dict(
        {"id": [f"q{i:03d}" for i in range(len(kept))], "image": [str(MINI_SCAR / r["qry_image_path"]) for r in kept]}
    ).cast_column("image", datasets.Image())
    task = per_query_task(metadata("MiniSCaRNoBox", "i2t", {"query": instruction}), queries,
                          [r["tgt_text"] for r in kept])  # fmt: skip
    wrapper = VirtueMtebModel(tiny_model, image_resize=RESIZE)
    assert wrapper.family(task.metadata) == "scar"

    # The wrapper turns mteb's query batches into exactly what `virtue eval` encodes (text and pixels).
    mine = load_scar_eval(scar_root / "SCaR_eval_RefCOCOg.parquet", MINI_SCAR, task="RefCOCOg", variant="no_box")
    loader = create_dataloader(queries, task_metadata=task.metadata, prompt_type=PromptType.query, batch_size=16)
    built = [x for b in loader for x in wrapper.build_inputs(b, task_metadata=task.metadata, prompt_type="query")]
    for item, query in zip(built, mine, strict=True):
        assert item.text == query.query.text and query.query.prompt is None
        stored = load_image(query.query.image)  # as `virtue eval` reads it (one photo is greyscale: mode L)
        assert item.image.mode == stored.mode and np.array_equal(np.asarray(item.image), np.asarray(stored))

    scores, predictions = run_mteb(wrapper, task, tmp_path)
    assert scores["hit_rate_at_1"] == scores["precision_at_1"] == round(ours["hit@1"], 5)

    # Per query, too: mteb ranked exactly the query's own captions, its top one is `virtue eval`'s, scores agree.
    for i, ref in enumerate(kept_scores):
        got = predictions[f"q{i:03d}"]
        assert {task.doc_text[d] for d in got} == set(kept[i]["tgt_text"])
        assert task.doc_text[max(got, key=got.get)] == kept[i]["tgt_text"][int(np.argmax(ref))]
        np.testing.assert_allclose(sorted(got.values()), np.sort(ref), atol=1e-5)


def test_mteb_breaks_ties_by_document_id(tiny_model, tmp_path, monkeypatch):
    """A constant model ties every candidate: mteb orders a tie by document id, descending (pytrec_eval's rule),
    so exactly the queries whose positive has the highest id score a hit; `virtue eval` counts every tie against
    the positive (hit@1 = 0)."""
    vector = np.ones(tiny_model.config.hidden_size, dtype=np.float32) / np.sqrt(tiny_model.config.hidden_size)
    monkeypatch.setattr(tiny_model, "encode", lambda items, **kw: np.tile(vector, (len(items), 1)))
    images = [Image.new("RGB", (32, 32), (40 * i, 0, 0)) for i in range(4)]
    queries = datasets.Dataset.from_dict({"id": ["q0", "q1", "q2", "q3"], "image": images})
    captions = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"], ["j", "k", "l"]]  # positives a, d, g, j
    # q0, q1: the positive has the lowest id of its list; q2, q3: the highest ("doc-z" > "doc-b" > "doc-a").
    doc_ids = {"a": "doc-a1", "b": "doc-b1", "c": "doc-c1", "d": "doc-a2", "e": "doc-m2", "f": "doc-b2",
               "g": "doc-z3", "h": "doc-a3", "i": "doc-b3", "j": "doc-z4", "k": "doc-y4", "l": "doc-a4"}  # fmt: skip
    task = per_query_task(metadata("ConstantTies", "i2t", {"query": "Find a caption."}), queries, captions, doc_ids)
    scores, predictions = run_mteb(VirtueMtebModel(tiny_model), task, tmp_path)
    assert all(len(set(p.values())) == 1 for p in predictions.values())  # every candidate tied
    assert scores["hit_rate_at_1"] == scores["precision_at_1"] == 0.5  # q2 and q3
    assert [rank_of_positive(np.zeros(3), 0) for _ in captions] == [3] * 4  # virtue eval: every positive last


def _png(path, colour) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)
    return str(path)


MMEB_IMAGE_INST = "<|image_1|>\nRepresent the given image."


@pytest.mark.parametrize(
    ("family", "category", "qry_inst", "qry_text", "query_image", "captions", "doc_images"),
    [
        ("cls", "i2c", "<|image_1|>\nRepresent the given image for classification", "", True, ["cat", "dog"], False),
        ("i2t", "i2t", "<|image_1|>\nFind an image caption describing the following everyday image.", "", True,
         ["a cat on a mat", "a dog"], False),
        ("qa", "it2t", "<|image_1|>\nRepresent the given image with the following question:", "What colour is it?",
         True, ["red", "blue"], False),
        ("t2i", "t2i", "Find me an everyday image that matches the given caption:", "a red square", False, ["", ""],
         True),
        ("t2i", "t2it", "Find a Wikipedia image that answers this question:", "Which flag is red?", False,
         ["Flag A", "Flag B"], True),
        ("vg", "it2i", "<|image_1|>\nFind an image that looks like this one.", "", True, ["", ""], True),
        ("vg", "i2it", "<|image_1|>\nRetrieve a Wikipedia image-description pair for this entity.", "", True,
         ["entity A", "entity B"], True),
    ],
)  # fmt: skip
def test_texts_equal_the_official_builders(tiny_model, tmp_path, family, category, qry_inst, qry_text, query_image,
                                           captions, doc_images):  # fmt: skip
    """For each MMEB family, the wrapper's texts from mteb's inputs (the bare instruction as mteb's TaskMetadata
    writes it) equal `virtue eval`'s from an MMEB_Test_Instruct row (the instruction as the dataset stores it)."""
    query_path = _png(tmp_path / "imgs/q.png", (200, 10, 10)) if query_image else ""
    doc_paths = [_png(tmp_path / f"imgs/d{i}.png", (10, 10 + 100 * i, 10)) for i in range(2)] if doc_images else None
    row = {"qry_inst": qry_inst, "qry_text": qry_text, "qry_img_path": "imgs/q.png" if query_image else "",
           "tgt_text": captions, "tgt_inst": MMEB_IMAGE_INST,
           "tgt_img_path": ["imgs/d0.png", "imgs/d1.png"] if doc_images else ["", ""]}  # fmt: skip
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "t.parquet")
    [reference] = load_mmeb_eval(tmp_path / "t.parquet", tmp_path, task="t", family=family)

    bare = qry_inst.replace("<|image_1|>\n", "")
    task_type = "ZeroShotClassification" if category == "i2c" else "Any2AnyRetrieval"
    meta = metadata(f"Local{category}", category, {"query": bare}, task_type)
    wrapper = VirtueMtebModel(tiny_model)
    assert wrapper.family(meta) == task_family(meta) == family
    query_type = None if category == "i2c" else PromptType.query
    doc_type = None if category == "i2c" else PromptType.document
    query_batch = {"id": ["q"], **({"text": [qry_text]} if qry_text else {}),
                   **({"image": [Image.open(query_path)]} if query_image else {})}  # fmt: skip
    [query] = wrapper.build_inputs(query_batch, task_metadata=meta, prompt_type=query_type)
    assert query.text == reference.query.text and query.has_image == query_image

    doc_batch = {"id": ["d0", "d1"], "text": captions}
    if doc_images:
        doc_batch["image"] = [Image.open(p) for p in doc_paths]
    docs = wrapper.build_inputs(doc_batch, task_metadata=meta, prompt_type=doc_type)
    assert [d.text for d in docs] == [c.text for c in reference.candidates]
    assert [d.has_image for d in docs] == [doc_images] * 2


def test_encode_through_mteb_dataloader(tiny_model):
    """mteb's DataLoader of image+text rows: float32, normalised, in order, equal to `VirtueModel.encode`."""
    images = [Image.new("RGB", (60 + 20 * i, 40), (30 * i, 90, 150)) for i in range(3)]
    data = datasets.Dataset.from_dict({"id": ["a", "b", "c"], "image": images,
                                       "text": ["What is it?", "Which colour?", "How many?"]})  # fmt: skip
    meta = metadata("LocalVQA", "it2t", {"query": "Represent the given image with the following question:"})
    wrapper = VirtueMtebModel(tiny_model, chunk_size=2)  # two model calls
    loader = create_dataloader(data, task_metadata=meta, prompt_type=PromptType.query, batch_size=2)
    out = wrapper.encode(loader, task_metadata=meta, hf_split="test", hf_subset="default",
                         prompt_type=PromptType.query, batch_size=2)  # fmt: skip
    assert out.dtype == np.float32 and out.shape == (3, tiny_model.config.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    texts = [f"<|image_pad|>\nRepresent the given image with the following question: {q}\n" for q in data["text"]]
    ref = tiny_model.encode([{"image": im, "text": t} for im, t in zip(images, texts, strict=True)])
    np.testing.assert_allclose(out, ref, atol=1e-5)
    meta_ = wrapper.mteb_model_meta
    assert meta_.experiment_kwargs["sam_branch"] == "grid" and meta_.revision and "/" in meta_.name


def test_loads_a_checkpoint_path_with_its_evaluation_settings(fixture_dir, tiny_model):
    """A path is loaded with `from_pretrained`; an official checkpoint brings the official 1344x1344 pre-resize;
    the results' revision is the weights' hash, so another model never reuses cached mteb results."""
    from virtue.errors import ConfigError

    wrapper = VirtueMtebModel(fixture_dir / "checkpoint", allow_hub=False)
    assert wrapper.image_resize == (1344, 1344) and wrapper.model.sam is not None
    meta = wrapper.mteb_model_meta
    assert meta.name == "virtue/checkpoint" and meta.embed_dim == wrapper.model.config.hidden_size
    assert meta.experiment_kwargs == {"implementation": "virtue", "sam_branch": "grid", "image_resize": "1344x1344"}
    assert meta.revision != VirtueMtebModel(tiny_model).mteb_model_meta.revision
    assert VirtueMtebModel(tiny_model, "v1", name="me/tiny").mteb_model_meta.revision == "v1"
    with pytest.raises(ConfigError, match="loaded VirtueModel"):
        VirtueMtebModel(tiny_model, device="cpu")
    with pytest.raises(ConfigError, match="families"):
        VirtueMtebModel(tiny_model, families={"T": "retrieval"})
