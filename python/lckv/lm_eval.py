"""python -m lckv.lm_eval: lm-eval's command line with the model `lckv` registered.

    python -m lckv.lm_eval run --model lckv --model_args pretrained=DIR --tasks TASKS

The same as the `lm_eval` command of an installed lckv (whose lckv_lm_eval.pth registers the model
in every interpreter); this front also works from a source tree (PYTHONPATH=python)."""

import sys


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    from .lm_eval_adapter import register

    register()
    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
