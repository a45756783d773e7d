"""The data layouts docs/evaluation.md documents are what the suites read, with .jpg and .png images alike;
missing images stop `mllm eval` before the model loads; the two answer normalisations (official,
lmms-eval) differ where documented and agree where they should; an unknown suite gets a suggestion."""

import base64
import io
import json
import random
import re
from pathlib import Path

import pytest
from PIL import Image

from eval import runner
from eval.scoring.gqa import gqa_scores, lmms_eval_normalize, normalize_answer
from eval.scoring.vqa import lmms_eval_answer_processor, lmms_eval_vqav2, vqa_accuracy
from eval.suites import get_suite, suite_names
from eval.suites.base import IMAGE_SUFFIXES, MissingImage, missing_images
from mllm import cli

DOCS = Path(__file__).resolve().parents[2] / "docs" / "evaluation.md"
IMAGE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


# ---------------------------------------------------------------------------------------- the documented trees
def documented_layouts() -> dict[str, tuple[list[str], str]]:
    """{suite: (tree lines, --data)} from the "### `suite`" sections of docs/evaluation.md: the first text
    block after the heading is the tree, the first `--data X` of the bash block after it is --data."""
    text = DOCS.read_text()
    start = text.index("## Data layouts")
    end = text.index("\n## ", start)
    layouts = {}
    for section in re.split(r"\n(?=### )", text[start:end])[1:]:
        heading = section.splitlines()[0]
        tree = re.search(r"```text\n(.*?)```", section, re.DOTALL)
        command = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
        data = re.search(r"mllm eval .*?--data (\S+)", command.group(1), re.DOTALL) if command else None
        assert tree and data, f"the section {heading!r} lacks its tree or its command"
        for name in re.findall(r"`([^`]+)`", heading):
            layouts[name] = (tree.group(1).splitlines(), data.group(1))
    return layouts


def tree_paths(lines: list[str]) -> list[str]:
    """A drawn tree ("├── name", "│   └── name", ...) -> relative paths; folders end with "/"."""
    paths, stack = [], []
    for line in lines:
        match = re.match(r"^((?:│   |    )*)(?:├── |└── )?(\S+)", line)
        depth = len(match.group(1)) // 4 + (1 if re.search(r"[├└]── ", line) else 0)
        name = match.group(2)
        stack = stack[:depth] + [name]
        paths.append("".join(stack))
    return paths


def _image(path: Path, suffix: str, color=(200, 30, 30)) -> Path:
    path = path.with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path, IMAGE_FORMATS[suffix])
    return path


def _coco_id(stem: str) -> int:
    return int(stem.rsplit("_", 1)[-1])


def _jsonl(rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _content(name: str, stems: list[str], folder: Path, images: list[Path], suffix: str) -> str:
    """The content of a benchmark file named `name`, about the images of the tree (their stems)."""
    ten = [{"answer": "cat", "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]
    if name.endswith("questions.json") and name.startswith("v2_"):
        return json.dumps({"data_subtype": "val2014", "questions": [
            {"image_id": _coco_id(s), "question": "What is it?", "question_id": _coco_id(s) * 1000} for s in stems]})
    if name.endswith("annotations.json"):
        return json.dumps({"data_subtype": "val2014", "annotations": [
            {"image_id": _coco_id(s), "question_id": _coco_id(s) * 1000, "answer_type": "other",
             "question_type": "what is", "answers": ten} for s in stems]})
    if name.startswith("TextVQA_0.5.1"):
        return json.dumps({"data": [{"question_id": k, "image_id": s, "question": "what brand?",
                                     "answers": ["cat"] * 10} for k, s in enumerate(stems)]})
    if name.startswith("TextVQA_Rosetta_OCR"):
        return json.dumps({"data": [{"image_id": s, "ocr_tokens": []} for s in stems]})
    if name == "val.json":
        return json.dumps([{"image": f"{s}.jpg", "question": "what is it?", "answers": ten, "answer_type": "other",
                            "answerable": 1} for s in stems])
    if name == "testdev_balanced_questions.json":
        return json.dumps({f"q{k}": {"imageId": s, "question": "Is it red?", "answer": "yes",
                                     "types": {"structural": "verify", "semantic": "attr"}}
                           for k, s in enumerate(stems)})
    if name.startswith("coco_pope_"):
        return _jsonl({"question_id": k, "image": f"{s}.jpg", "text": "Is there a cat?", "label": "yes"}
                      for k, s in enumerate(stems))
    if name.startswith("captions_"):
        return json.dumps({"images": [{"id": _coco_id(s), "file_name": f"{s}.jpg"} for s in stems],
                           "annotations": [{"image_id": _coco_id(s), "caption": "a cat"} for s in stems]})
    if name.endswith(".tsv"):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (20, 200, 30)).save(buffer, IMAGE_FORMATS[suffix])
        image = base64.b64encode(buffer.getvalue()).decode()
        header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\tl2-category\timage"
        return f"{header}\n0\tWhat colour?\tnan\tred\tgreen\tnan\tnan\tB\tcolor\tattribute\t{image}\n"
    if name == "evaluation_metadata.jsonl":
        return _jsonl([{"prompt": "a photo of a cat", "tag": "single_object"}])
    if name == "prompts.jsonl":
        return _jsonl([{"prompt": "a red circle", "category": "single_object"}])
    if name == "references.jsonl":
        return _jsonl({"prompt": "a red circle", "image": str(image.relative_to(folder))} for image in images)
    raise AssertionError(f"no content for a documented file named {name}")


def build(tree: list[str], root: Path, suffix: str) -> list[Path]:
    """Make the documented tree under `root`, its images saved with `suffix` (the benchmarks name them .jpg);
    returns the image files."""
    from mllm.data.shapes import iter_samples
    from mllm.data.shards import write_shards

    paths = tree_paths(tree)
    images = [_image(root / p, suffix) for p in paths if Path(p).suffix in IMAGE_SUFFIXES]
    stems = [image.stem for image in images]
    for relative in paths:
        path = root / relative
        if relative.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        if Path(relative).suffix in IMAGE_SUFFIXES or path.name == "index.json":  # made above / with the shards
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if re.fullmatch(r"shard-\d+\.tar", path.name):
            write_shards(iter_samples(3, split="test", size=32), path.parent, progress=False)
        else:
            path.write_text(_content(path.name, stems, path.parent, images, suffix))
    return images


LAYOUTS = documented_layouts()
LOADED = sorted(name for name in suite_names() if name != "tokenizer")  # the tokenizer suite runs a model


def test_every_suite_has_a_documented_layout_and_a_help_line(capsys):
    assert set(suite_names()) <= set(LAYOUTS)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    epilog = help_text[help_text.index("suites and what --data holds"):]
    for name in suite_names():
        assert re.search(rf"^  {re.escape(name)} +\S", epilog, re.MULTILINE), name
    assert "COCO_<split>_<image_id:012d>.jpg" in epilog and "v2_mscoco_<split>_annotations.json" in epilog
    assert max(len(line) for line in epilog.splitlines()) <= 100


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("name", LOADED)
def test_the_documented_layout_is_read_with_jpg_and_png_images(name, suffix, tmp_path):
    tree, data = LAYOUTS[name]
    images = build(tree, tmp_path, suffix)
    suite = get_suite(name)
    suite.configure({})
    items = suite.load_items(str(tmp_path / data), None)
    assert items
    total, missing = missing_images(items)
    assert missing == []
    paths = [item.image for item in items if isinstance(item.image, str) and not item.image.startswith("data:")]
    assert total == len(set(paths))
    if suite.kind == "answer" and images:  # every documented image is an item's, found with its suffix on disk
        assert sorted(set(paths)) == sorted(str(image) for image in images)
        assert all(Path(path).suffix == suffix for path in paths)
    if name == "mmbench":
        assert items[0].image.startswith("data:image/png" if suffix == ".png" else "data:image/jpeg")
    if name == "fid":
        assert sorted(item.meta["reference"] for item in items) == sorted(str(image) for image in images)


# ---------------------------------------------------------------------------------------- missing images
@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: whatever is checked must be checked before."""
    import mllm

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mllm, "load", load)


def _vqav2(tmp_path, ids=(42, 73, 74, 75, 76), keep=(42,)) -> Path:
    data = tmp_path / "vqav2"
    stems = [f"COCO_val2014_{i:012d}" for i in ids]
    for name in ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text(_content(name, stems, data, [], ".jpg"))
    for i in keep:
        _image(data / "val2014" / f"COCO_val2014_{i:012d}", ".png")
    return data


def test_missing_images_are_named_before_the_model_loads(tmp_path, no_model):
    data = _vqav2(tmp_path)
    settings = runner.EvalSettings(suite="vqav2", out=tmp_path / "out", model=str(tmp_path / "model"),
                                   data=str(data), progress=False)
    with pytest.raises(FileNotFoundError) as error:
        runner.evaluate(settings)
    message = str(error.value)
    assert message.startswith(f"4 of 5 images are missing under {data}: COCO_val2014_000000000073.jpg, "
                              "COCO_val2014_000000000074.jpg, COCO_val2014_000000000075.jpg, ... (expected names: "
                              "COCO_<split>_<image_id:012d>.jpg")
    assert "\n" not in message
    assert not (tmp_path / "out" / runner.PREDICTIONS_NAME).exists()

    # --limit 1 keeps only the question whose image is there (as .png): the check passes and the model loads
    settings.limit = 1
    with pytest.raises(AssertionError, match="the model was loaded"):
        runner.evaluate(settings)


def test_the_command_prints_one_line_and_exits_2(tmp_path, no_model, capsys):
    data = _vqav2(tmp_path, ids=(42, 73), keep=(42,))
    code = cli.main(["eval", "--model", str(tmp_path / "model"), "--suite", "vqav2", "--data", str(data),
                     "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"mllm eval: error: 1 of 2 images are missing under {data}: "
                          "COCO_val2014_000000000073.jpg (expected names:")


def test_predictions_already_made_need_no_image(tmp_path, no_model, capsys):
    data = _vqav2(tmp_path, ids=(42, 73), keep=())
    out = tmp_path / "out"
    out.mkdir()
    (out / runner.PREDICTIONS_NAME).write_text(_jsonl([{"id": "42000", "answer": "cat"},
                                                       {"id": "73000", "answer": "dog"}]))
    results = runner.evaluate(runner.EvalSettings(suite="vqav2", out=out, model=str(tmp_path / "model"),
                                                  data=str(data), progress=False))
    assert results["metrics"]["accuracy"] == pytest.approx(50.0)


def test_a_missing_image_of_a_suite_with_fixed_folders(tmp_path):
    tree, data = LAYOUTS["pope"]
    images = build(tree, tmp_path, ".jpg")
    images[0].unlink()
    items = get_suite("pope").load_items(str(tmp_path / data), None)
    total, missing = missing_images(items)
    assert total == 1 and isinstance(missing[0], MissingImage) and missing[0].names == [images[0].name]
    with pytest.raises(FileNotFoundError, match=re.escape(images[0].name)):
        Image.open(items[0].image)  # a model opening it anyway gets the reason, not a bare path error


# ---------------------------------------------------------------------------------------- normalisation
def test_cat_against_ten_cats_differs_between_the_modes():
    assert vqa_accuracy("Cat", ["cat"] * 10) == 0.0
    assert vqa_accuracy("Cat", ["cat"] * 10, lmms_eval_vqav2) == 1.0
    assert vqa_accuracy("Cat", ["cat"] * 10, lmms_eval_answer_processor) == 1.0
    assert vqa_accuracy("cat.", ["cat"] * 10) == 0.0
    assert vqa_accuracy("cat.", ["cat"] * 10, lmms_eval_vqav2) == 1.0
    assert vqa_accuracy("cat", ["cat"] * 10) == vqa_accuracy("cat", ["cat"] * 10, lmms_eval_vqav2) == 1.0


def test_the_documented_table_rows():
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7, lmms_eval_vqav2) == pytest.approx(0.9)
    assert normalize_answer("Yes!") != normalize_answer("yes")
    assert lmms_eval_normalize("Yes!") == lmms_eval_normalize("yes")


def test_the_lmms_eval_processors_step_by_step():
    # EvalAIAnswerProcessor: lower-case, "," and "?" deleted, "'s" split off, then punctuation, digits, articles
    assert lmms_eval_answer_processor("The dog's Ball?") == "dog 's ball"
    assert lmms_eval_answer_processor("Two, maybe") == "2 maybe"
    assert lmms_eval_vqav2(" A  Red/White\tsign. ") == "red white sign"
    assert lmms_eval_vqav2("Dont") == "don't"
    assert lmms_eval_normalize(" T-shirt. ") == " tshirt "  # surrounding spaces are kept, as lmms-eval keeps them


def test_the_modes_agree_where_the_annotators_disagree():
    """The official rule normalises exactly when the annotators disagree; lmms-eval's VQAv2 rule always does
    the same normalisation, so on such questions the two must give the same accuracy."""
    rng = random.Random(0)
    words = ["Yes", "yes", "no", "two", "2", "a dog", "the Dog", "red/white", "3.", "cat", "Cat."]
    compared = 0
    for _ in range(500):
        answers = [rng.choice(words) for _ in range(10)]
        prediction = rng.choice(words)
        if len(set(answers)) > 1:
            compared += 1
            assert vqa_accuracy(prediction, answers) == vqa_accuracy(prediction, answers, lmms_eval_vqav2)
    assert compared > 400


@pytest.mark.parametrize("name", ["vqav2", "textvqa", "vizwiz"])
def test_eval_score_takes_the_option_and_records_the_mode(name, tmp_path, capsys):
    tree, data = LAYOUTS[name]
    build(tree, tmp_path, ".jpg")
    suite = get_suite(name)
    items = suite.load_items(str(tmp_path / data), None)
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(_jsonl({"id": item.id, "answer": "Cat"} for item in items))
    official = runner.score_file(name, predictions, data=str(tmp_path / data))
    lmms = runner.score_file(name, predictions, data=str(tmp_path / data), options={"normalize": "lmms-eval"})
    assert (official["metrics"]["accuracy"], lmms["metrics"]["accuracy"]) == (0.0, 100.0)
    assert (official["normalize"], lmms["normalize"]) == ("official", "lmms-eval")
    assert "normalize=lmms-eval" in capsys.readouterr().out
    with pytest.raises(ValueError, match="did you mean lmms-eval"):
        runner.score_file(name, predictions, data=str(tmp_path / data), options={"normalize": "lmms"})


def test_gqa_takes_the_option_too(tmp_path, capsys):
    tree, data = LAYOUTS["gqa"]
    build(tree, tmp_path, ".jpg")
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(_jsonl([{"id": "q0", "answer": "Yes!"}]))
    assert runner.score_file("gqa", predictions, data=str(tmp_path / data))["metrics"]["accuracy"] == 0.0
    lmms = runner.score_file("gqa", predictions, data=str(tmp_path / data), options={"normalize": "lmms-eval"})
    assert lmms["metrics"]["accuracy"] == 100.0 and lmms["normalize"] == "lmms-eval"
    code = cli.main(["eval-score", "--suite", "gqa", "--predictions", str(predictions), "--data",
                     str(tmp_path / data), "--option", "normalize=lmms-eval"])
    assert code == 0 and capsys.readouterr().out.strip().splitlines()[-1] == "accuracy 100.00"
    result = gqa_scores({"a": "Left.", "b": "left"}, {"a": "left", "b": "left"}, normalizer=lmms_eval_normalize)
    assert result["accuracy"] == gqa_scores({"a": "Left.", "b": "left"}, {"a": "left", "b": "left"})["accuracy"]


def test_eval_records_the_mode_in_the_results_file(tmp_path, monkeypatch):
    import mllm

    class Answers:  # a model that answers "Cat" to everything
        def generate_text(self, conversations, max_new_tokens):
            return ["Cat"] * len(conversations)

    monkeypatch.setattr(mllm, "load", lambda *args, **kwargs: Answers())
    data = _vqav2(tmp_path, ids=(42,), keep=(42,))
    out = tmp_path / "out"
    results = runner.evaluate(runner.EvalSettings(suite="vqav2", out=out, model="m", data=str(data),
                                                  progress=False, options={"normalize": "lmms-eval"}))
    saved = json.loads((out / runner.RESULTS_NAME).read_text())
    assert results["metrics"]["accuracy"] == saved["metrics"]["accuracy"] == 100.0
    assert saved["normalize"] == "lmms-eval" and saved["options"] == {"normalize": "lmms-eval"}


# ---------------------------------------------------------------------------------------- unknown suite
@pytest.mark.parametrize("command", [["eval", "--out", "o"], ["eval-score", "--predictions", "p.jsonl"]])
def test_an_unknown_suite_gets_the_closest_name(command, capsys, no_model):
    assert cli.main([*command, "--suite", "vqa2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"mllm {command[0]}: error: unknown suite 'vqa2'; did you mean vqav2? (choose from: " in err
