"""`python -m eval.lmms_eval_plugin export ...`: see eval/lmms_eval_plugin/export.py."""

import sys

from eval.lmms_eval_plugin.export import main

sys.exit(main())
