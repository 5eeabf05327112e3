"""Child side of the trial load of an untrusted model (see
:func:`collapse_core.validation.trial_load`): ``python -m collapse_core.trial_load '<json>'``.

Loads the model on CPU exactly as the app would, renders its chat template the way training and
evaluation do, runs one short forward pass, and prints one JSON line: ``{"ok": true}`` or
``{"error": "<one line>"}``. The parent runs this under an address-space limit and a wall clock.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    """Run the trial described by ``argv[1]`` (JSON: spec, base, allow_pickle)."""
    from .errors import CollapseError
    from .validation import TRIAL_CHILD_ENV

    os.environ[TRIAL_CHILD_ENV] = "1"  # the load below must not start another trial
    try:
        args = json.loads(argv[1])
        import torch

        from .models import load_model
        from .train.objectives import format_example, prompt_token_ids

        torch.set_num_threads(1)
        loaded = load_model(args["spec"], args.get("base"), device="cpu",
                            allow_pickle=bool(args.get("allow_pickle")), verbose=False)  # fmt: skip
        prompt = "Explain, step by step, how to add two fractions. " * 20
        example = format_example(loaded.tokenizer, prompt, "First find a common denominator. " * 10)
        prompt_token_ids(loaded.tokenizer, prompt)
        ids = torch.tensor([example["input_ids"][:16] or [0]])
        with torch.no_grad():
            loaded.model(input_ids=ids)
    except CollapseError as err:
        print(json.dumps({"error": str(err).splitlines()[0] if str(err) else "refused"}))
        return 0
    except MemoryError:
        print(json.dumps({"error": "memory"}))
        return 0
    except Exception as err:  # noqa: BLE001 - reported to the parent as one line
        text = str(err).splitlines()[0][:200] if str(err) else ""
        print(json.dumps({"error": f"{type(err).__name__}: {text}", "kind": "crash"}))
        return 0
    print(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
