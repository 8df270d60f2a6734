"""Chance level: a stage-2 run whose selected model is no better than chance on the validation split is
a failure, not a result (docs/reliability.md §1), unless ``--allow-chance`` says that is the expected
outcome (a random ticket at an extreme sparsity, say); such a kept result is marked in its config."""

from utils.errors import UserError

CHANCE_MARGIN = 2.0  # percentage points of validation SA above 100/classes that still count as chance level


def selected_val_sa(state):
    """The validation SA of the selected epoch (None when that epoch was not validated)."""
    epoch = (state["best"] or {}).get("epoch")
    return next((row["val_sa"] for row in state["history"] if row["epoch"] == epoch), None)


def at_chance(val_sa, classes):
    return val_sa is not None and val_sa <= 100.0 / classes + CHANCE_MARGIN


def check_chance_level(args, state, classes, kept):
    """The keys that mark the result in results.json's config: ``chance_level`` under --allow-chance,
    none otherwise. Without the flag a selected model at chance raises, ``kept`` saying what the run
    leaves behind and how to go on (as a diverged run's message does)."""
    sa = selected_val_sa(state)
    if getattr(args, "allow_chance", False):
        return {"chance_level": at_chance(sa, classes)}
    if at_chance(sa, classes):
        raise UserError(f"the selected model (epoch {state['best']['epoch'] + 1}) is at chance level: validation SA "
                        f"{sa:.2f}% with {classes} classes (chance {100.0 / classes:.2f}%), most likely from too high a "
                        f"learning rate (--lr {args.lr:g}); {kept} If chance level is the expected outcome, rerun with "
                        "--allow-chance.")
    return {}
