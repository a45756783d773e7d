"""The demo pipeline: the whole project on the shapes world, on one CPU machine.

    data (train + held-out test scenes) -> teacher -> dual-codebook tokenizer -> tokenizer metrics
    -> init -> pretokenize -> shapes-pretrain [-> shapes-sft (LoRA) -> merge] -> DIR/model
    -> shapes-vqa, shapes-caption, shapes-t2i, shapes-edit, shapes-multi, and VQA and the tokenizer on the
       held-out rasteriser's scenes -> DIR/report.md + DIR/report.png

`plans` says what is trained and the quality bars, `pipeline` runs the stages (resumable, each stage one
library call), `report` writes what came out. It is the top layer: it uses every package and no package
uses it. Run it with `mllm demo --out DIR` (`make demo`).
"""

from demo.pipeline import Stage, ablation_stages, run_ablations, run_demo, run_stages, stages
from demo.plans import (
           BARS,
           OTHER_LOOK_TOKENIZER,
           OTHER_LOOK_VQA,
           OTHER_SIZE_VQA,
           PLANS,
           Plan,
           get_plan,
           model_dir,
           scaled,
)
from demo.report import ablation_table, write_report

__all__ = ["BARS", "OTHER_LOOK_TOKENIZER", "OTHER_LOOK_VQA", "OTHER_SIZE_VQA", "PLANS", "Plan", "Stage", "ablation_stages", "ablation_table", "get_plan",
           "model_dir", "run_ablations", "run_demo", "run_stages", "scaled", "stages", "write_report"]
