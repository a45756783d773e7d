"""The lmms-eval tasks `shapes_vqa` and `shapes_caption` (YAML files beside this one; pass this folder as
`--include_path`). Their data lives in `data/`, written by `python -m eval.lmms_eval_plugin export`."""
