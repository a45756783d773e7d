"""lmms-eval's older plugin contract (`LMMS_EVAL_PLUGINS=eval.lmms_eval_plugin`): model name -> class name of
the module `eval.lmms_eval_plugin.models.<name>`."""

AVAILABLE_MODELS = {"mllm": "MLLMLmms"}
