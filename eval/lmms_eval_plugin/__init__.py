"""lmms-eval support: our models as the lmms-eval model `mllm`, and the shapes suites as lmms-eval tasks.

    python -m eval.lmms_eval_plugin export                   # shapes-vqa / shapes-caption -> tasks/data/
    lmms-eval --model mllm --model_args pretrained=runs/demo/model,batch_size=16 \
        --tasks shapes_vqa --include_path eval/lmms_eval_plugin/tasks

lmms-eval finds the model through the entry point group `lmms_eval.models` (pyproject.toml: `mllm =
"eval.lmms_eval_plugin:manifest"`) or, in its older way, through `LMMS_EVAL_PLUGINS=eval.lmms_eval_plugin`
(which reads `eval.lmms_eval_plugin.models.AVAILABLE_MODELS` and also adds `eval/lmms_eval_plugin/tasks` to
the task path). Nothing here imports lmms-eval, torch or the model until lmms-eval asks for the class.

    models/mllm.py    the `lmms` subclass (`generate_until`, batched; `loglikelihood`)
    tasks/*.yaml      the `shapes_vqa` and `shapes_caption` tasks over local parquet files
    tasks/utils.py    doc_to_visual / doc_to_text / doc_to_target / process_results, scored by eval.suites
    export.py         our suites' items -> those parquet files (and, for another folder, the task YAMLs)

docs/lmms-eval.md says how lmms-eval's figures relate to `mllm eval`'s.
"""

MODEL_NAME = "mllm"
MODEL_CLASS_PATH = "eval.lmms_eval_plugin.models.mllm.MLLMLmms"


def manifest():
    """The entry point of group `lmms_eval.models`: a `ModelManifest` naming our simple model class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS_PATH)


__all__ = ["MODEL_CLASS_PATH", "MODEL_NAME", "manifest"]
